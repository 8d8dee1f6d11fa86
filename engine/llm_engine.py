"""The engine loop: requests in, one scheduled model step at a time, deltas out.

``LLMEngine`` wires the pieces: weights -> model, KV cache + block pool ->
KV cache manager -> scheduler, model runner + sampler, detokenizers. Both
worker pools and the offline ``LLM`` drive it through ``add_request``,
``step`` and ``abort``; the hand-off hooks (``reserve_for_transfer``,
``complete_transfer``, ``prefill_only``) serve disaggregation.

With ``async_scheduling`` (the default when CUDA graphs run) a step of
decodes is followed at once by the next one, launched before the host reads
the first one's tokens (``async_step``); ``step`` still returns one step's
deltas per call, the same tokens as the synchronous path.
"""

import time

import torch

from pdserve.engine.async_step import Lookahead, runs_ahead
from pdserve.engine.block_pool import BlockPool
from pdserve.engine.config import EngineConfig, ModelConfig
from pdserve.engine.kv_cache import KVCache, KVCacheSpec, blocks_for_budget
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.llama import LayerHook, LlamaForCausalLM
from pdserve.engine.model_runner import ModelInputs, ModelRunner
from pdserve.engine.outputs import StepDelta
from pdserve.engine.request import Request, RequestStatus
from pdserve.engine.sampler import SampleResult
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler, SchedulerOutput
from pdserve.engine.tokenizer import IncrementalDetokenizer, load_tokenizer
from pdserve.engine.weights import load_state_dict, resolve_model_dir


class PromptTooLongError(ValueError):
    pass


def build_model(model_cfg: ModelConfig, max_len: int, device: torch.device, dtype: torch.dtype,
                state: dict | None, seed: int) -> LlamaForCausalLM:
    """Create the model directly on ``device``; load ``state`` or (None) random weights."""
    from pdserve.engine.rope import RotaryEmbedding

    with torch.device("meta"):
        model = LlamaForCausalLM(model_cfg, 1)
    model = model.to(dtype).to_empty(device=device)
    if state is None:
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=gen)
        if model_cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
    else:
        model.load_weights(state)
    model.rope = RotaryEmbedding(model_cfg.head_dim, max_len, model_cfg.rope_theta,
                                 dict(model_cfg.rope_scaling)).to(device)
    return model.eval()


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        from transformers import AutoConfig

        self.config = config
        self.model_dir = resolve_model_dir(config.model)
        hf_cfg = AutoConfig.from_pretrained(str(self.model_dir))
        self.model_config = ModelConfig.from_hf(hf_cfg)
        mc = self.model_config
        self.tokenizer = load_tokenizer(self.model_dir)
        self.device = config.torch_device()
        self.dtype = config.torch_dtype()
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings,
                                 mc.max_position_embeddings)
        dummy = config.extra.get("load_format") == "dummy"
        state = None if dummy else load_state_dict(self.model_dir)
        self.model = build_model(mc, self.max_model_len, self.device, self.dtype, state,
                                 config.seed)
        del state
        num_blocks = config.num_blocks or self._auto_num_blocks()
        self.kv_spec = KVCacheSpec(mc.num_layers, num_blocks, config.block_size,
                                   mc.num_kv_heads, mc.head_dim, self.dtype)
        self.kv_cache = KVCache(self.kv_spec, self.device)
        self.pool = BlockPool(num_blocks, config.enable_prefix_caching)
        self.kv_manager = KVCacheManager(self.pool, config.block_size, config.hash_seed)
        self.scheduler = Scheduler(self.kv_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens, self.max_model_len)
        self.runner = ModelRunner(self.model, self.kv_cache, self.device, config.seed,
                                  max_num_seqs=config.max_num_seqs,
                                  max_model_len=self.max_model_len,
                                  cuda_graphs=config.cuda_graphs)
        overlap = config.async_scheduling
        if overlap is None:
            overlap = self.runner.graphs is not None
        self.lookahead = Lookahead(self.scheduler, self.runner) if overlap else None
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self.finished_prefills: list[Request] = []  # prefill_only requests holding blocks
        self.num_steps = 0  # steps whose results ``step`` has returned
        # the step a layer hook runs in; after ``step`` returns, the step it reported
        self.current_schedule: SchedulerOutput | None = None

    def _auto_num_blocks(self) -> int:
        mc, cfg = self.model_config, self.config
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(free - total * (1 - cfg.gpu_memory_utilization))
        else:
            budget = int(cfg.kv_cache_memory_gb * (1 << 30))
        return blocks_for_budget(mc, cfg.block_size, self.dtype, max(budget, 0))

    # ---- requests --------------------------------------------------------------------
    def make_request(self, request_id: str, prompt_token_ids: list[int],
                     params: SamplingParams, prefill_only: bool = False) -> Request:
        """Validate a prompt and build its Request (not queued). Raises ValueError naming
        the problem. Pure."""
        if not isinstance(params, SamplingParams):
            raise TypeError("params must be a SamplingParams")
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if n >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {n} tokens, the model's context is {self.max_model_len} "
                "(the prompt must leave room for at least one new token)")
        if -(-(n + 1) // self.config.block_size) > self.pool.num_blocks:
            raise PromptTooLongError(
                f"prompt has {n} tokens, more than the KV pool holds "
                f"({self.pool.num_blocks * self.config.block_size} tokens)")
        room = self.max_model_len - n
        max_tokens = min(params.max_tokens or room, room)
        return Request(request_id=request_id, prompt_token_ids=list(prompt_token_ids),
                       params=params, max_tokens=max_tokens,
                       eos_token_ids=self.eos_token_ids, arrival_time=time.monotonic(),
                       prefill_only=prefill_only)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(ids))

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams, prefill_only: bool = False) -> Request:
        """Validate and queue. Mutates the scheduler."""
        req = self.make_request(request_id, prompt_token_ids, params, prefill_only)
        self.scheduler.add(req)
        self._detok[request_id] = self._detokenizer(params)
        return req

    def _detokenizer(self, params: SamplingParams) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.tokenizer, params.stop, params.skip_special_tokens,
                                      params.include_stop_str_in_output)

    def reserve_for_transfer(self, request_id: str, prompt_token_ids: list[int],
                             params: SamplingParams) -> Request | None:
        """Decode side: hold blocks for the prompt (prefix hits reused). None if the pool
        is short. Mutates the scheduler and pool."""
        req = self.make_request(request_id, prompt_token_ids, params)
        if self.lookahead is not None:
            self.lookahead.wait()  # blocks freed under the step in flight: its writes first
        if not self.scheduler.reserve_for_transfer(req):
            return None
        self._detok[request_id] = self._detokenizer(params)
        return req

    def complete_transfer(self, request_id: str, first_token_id: int) -> StepDelta:
        """Decode side: the KV landed; queue the request to decode after ``first_token_id``.
        Returns the first token's delta. Mutates the scheduler."""
        req = self.scheduler.complete_transfer(request_id, first_token_id)
        self.scheduler._check_stop(req, first_token_id)
        return self._delta(req, [first_token_id], [])

    def abort(self, request_id: str) -> bool:
        """Abort in any state; frees its blocks. True if it was unfinished."""
        req = self.scheduler.abort(request_id)
        self._detok.pop(request_id, None)
        self.runner.sampler.forget(request_id)
        return req is not None

    def release_prefill(self, req: Request) -> None:
        """Free a finished prefill-only request's blocks once its KV has been sent."""
        if req in self.finished_prefills:
            self.finished_prefills.remove(req)
        self.scheduler.release(req)

    # ---- the loop --------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        """Unfinished requests, or a step in flight whose results ``step`` still owes."""
        return self.scheduler.has_unfinished or self._in_flight

    def has_work(self) -> bool:
        """Whether ``step`` has anything to run or to collect (see ``Scheduler.has_work``)."""
        return self.scheduler.has_work or self._in_flight

    @property
    def _in_flight(self) -> bool:
        return self.lookahead is not None and self.lookahead.in_flight is not None

    def step(self, layer_hook: LayerHook | None = None) -> list[StepDelta]:
        """Run one model step and return one delta per request that produced a token or
        finished in it. With the lookahead, the call launches the step after it before
        reading its tokens (a call may launch two, or none and only collect). Mutates
        everything the scheduler and runner own."""
        ahead = self.lookahead
        prev = ahead.take() if ahead is not None else None
        if prev is None:
            out = self.scheduler.schedule()
            if not out.scheduled:
                return []
            self.current_schedule = out
            if ahead is None or not runs_ahead(out):
                inputs, result = self.runner.execute(out, layer_hook)
                return self._process(out, inputs, result)
            prev = ahead.launch(out, layer_hook)
        nxt = ahead.plan_next(prev)
        if nxt is not None:
            self.current_schedule = nxt
            ahead.in_flight = ahead.launch(nxt, layer_hook, after=prev)
        return self._process(prev.schedule, prev.inputs, prev.sample.result())

    def _process(self, out: SchedulerOutput, inputs: ModelInputs,
                 result: SampleResult) -> list[StepDelta]:
        """Account a finished step: update the scheduler with its sampled ids (requests
        finished meanwhile are skipped: their tokens are dropped), stop checks, deltas.
        Mutates the scheduler, requests, detokenizers and ``current_schedule``."""
        self.num_steps += 1
        self.current_schedule = out
        sampled = {}
        logprobs = {}
        for i, s in enumerate(inputs.sample_order):
            sampled[s.request.request_id] = result.token_ids[i]
            logprobs[s.request.request_id] = result.logprobs[i]
        updated = self.scheduler.update(out, sampled)
        deltas = []
        for req in updated:
            lp = logprobs.get(req.request_id)
            deltas.append(self._delta(req, [req.output_token_ids[-1]], [lp] if lp else []))
        return deltas

    def _delta(self, req: Request, new_ids: list[int], new_lps: list) -> StepDelta:
        detok = self._detok.get(req.request_id)
        text = detok.push(new_ids) if detok else ""
        if detok and detok.stopped_on is not None and not req.status.finished:
            req.stop_reason = detok.stopped_on
            self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
        if req.status.finished:
            if detok:
                text += detok.flush()
            self._detok.pop(req.request_id, None)
            self.runner.sampler.forget(req.request_id)
            if req.prefill_only:
                self.finished_prefills.append(req)
        return StepDelta(
            request_id=req.request_id, new_token_ids=tuple(new_ids), new_text=text,
            finished=req.status.finished, finish_reason=req.finish_reason,
            stop_reason=req.stop_reason, new_logprobs=tuple(new_lps),
            num_prompt_tokens=req.num_prompt_tokens,
            num_output_tokens=len(req.output_token_ids),
            num_cached_tokens=req.num_cached_tokens)
