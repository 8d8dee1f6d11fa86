"""bench.gemm_floor: which weights a step multiplies, and the floor's bookkeeping."""

import torch

from pdserve.bench.gemm_floor import GemmFloor, decode_weights, measure
from pdserve.engine.config import ModelConfig
from pdserve.engine.linear import can_pack
from pdserve.engine.llama import LlamaForCausalLM

CFG = ModelConfig(model_type="llama", vocab_size=100, hidden_size=16, intermediate_size=24,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4, rms_norm_eps=1e-5,
                  rope_theta=10000.0, rope_scaling=(("rope_type", "default"),),
                  tie_word_embeddings=True, attention_bias=False, max_position_embeddings=64,
                  eos_token_ids=(2,))


def test_decode_weights_in_step_order():
    model = LlamaForCausalLM(CFG, 8)
    model.lm_head.weight = model.embed_tokens.weight  # tied: counted once, as lm_head
    shapes = [tuple(w.shape) for w in decode_weights(model)]
    layer = [(16 + 2 * 8, 16), (16, 16), (48, 16), (16, 24)]  # qkv, o, gate_up, down
    assert shapes == layer + layer + [(100, 16)]


def test_floor_is_the_fastest_form():
    floor = GemmFloor(8, 3, (("a", 5.0), ("b", 3.5), ("c", 4.0)))
    assert (floor.step_ms, floor.best_form) == (3.5, "b")


def test_measure_times_every_form():
    floor = measure([torch.ones(6, 4), torch.ones(3, 6)], batch=2, repeats=1)
    assert floor.batch == 2 and floor.num_gemms == 2
    packed = ["oneDNN packed"] if can_pack(torch.ones(1, 1)) else []
    assert [name for name, _ in floor.form_ms] == ["F.linear(x, W)", "mm(x, Wt)",
                                                   "(W @ x^T)^T", *packed]
    assert all(ms > 0 for _, ms in floor.form_ms)
