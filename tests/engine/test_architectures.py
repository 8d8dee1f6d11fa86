"""Llama 3 (rope scaling, untied), Qwen2 (QKV bias) and Mistral: small random-weight
models built here, checked token for token against transformers."""

import shutil

import pytest
import torch

from pdserve import LLM, SamplingParams

COMMON = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              initializer_range=0.3, bos_token_id=1, eos_token_id=2)


def _configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    yield "llama3", LlamaConfig(**COMMON, tie_word_embeddings=False, rope_theta=500000.0,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 64})
    yield "qwen2", Qwen2Config(**COMMON, tie_word_embeddings=True)
    yield "mistral", MistralConfig(**COMMON, tie_word_embeddings=False, sliding_window=None)
    yield "llama2-mha", LlamaConfig(**{**COMMON, "num_key_value_heads": 4},
                                    tie_word_embeddings=False)


@pytest.mark.parametrize("name", ["llama3", "qwen2", "mistral", "llama2-mha"])
def test_random_model_matches_transformers(name, tmp_path, smol_dir):
    from transformers import AutoModelForCausalLM

    cfg = dict(_configs())[name]
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    if name == "qwen2":  # make the QKV biases matter
        with torch.no_grad():
            for layer in hf.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                             layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    hf.save_pretrained(tmp_path)
    for f in smol_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, tmp_path / f.name)
    prompts = [[int(t) for t in torch.randint(3, 49152, (n,))] for n in (5, 37, 150)]
    llm = LLM(str(tmp_path), num_blocks=64, max_num_batched_tokens=64)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                        use_tqdm=False)
    for ids, out in zip(prompts, outs, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                              min_new_tokens=16, eos_token_id=None, pad_token_id=0,
                              attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        assert out.token_ids == ref[0, len(ids):].tolist()
