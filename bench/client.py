"""The streaming OpenAI client of the load generator (httpx, asyncio).

    run_workload(target, specs, bodies)  -> (results, duration_s)

Each request is sent at its ``arrival_s`` (from the start of the run) whether or not
earlier ones have finished (open loop), unless ``max_concurrency`` caps the number in
flight. The stream is read chunk by chunk; ``RequestResult.token_times_s`` gets the time
of every chunk that carries text, and the usage chunk (``stream_options.include_usage``)
gives the exact token counts.
"""

import asyncio
import json
import time
from dataclasses import dataclass

import httpx

from pdserve.bench.metrics_report import RequestResult
from pdserve.bench.workloads import RequestSpec


@dataclass(frozen=True)
class Target:
    base_url: str  # http://host:port
    model: str  # the served model's name, as /v1/models lists it
    endpoint: str = "completions"  # "completions" (token-id prompts) | "chat"
    api_key: str | None = None
    timeout_s: float = 600.0


def served_model(base_url: str, api_key: str | None = None) -> str:
    """The first model id that the server at ``base_url`` lists."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    reply = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=10.0)
    reply.raise_for_status()
    return reply.json()["data"][0]["id"]


def request_body(spec: RequestSpec, target: Target, tokenizer=None) -> dict:
    """The JSON body for ``spec``: greedy, exactly ``num_output_tokens`` new tokens
    (``ignore_eos``), streamed with usage. Chat needs ``tokenizer`` to turn the prompt ids
    into text (its length in tokens is then only close to the spec's)."""
    body = {"model": target.model, "max_tokens": spec.num_output_tokens, "ignore_eos": True,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
            "skip_special_tokens": False}  # every token shows text, so every token is timed
    if target.endpoint == "chat":
        text = tokenizer.decode(list(spec.prompt_token_ids))
        body["messages"] = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    else:
        body["prompt"] = list(spec.prompt_token_ids)
    return body


def _chunk_text(choice: dict) -> str:
    if "text" in choice:
        return choice.get("text") or ""
    return (choice.get("delta") or {}).get("content") or ""


async def send(client: httpx.AsyncClient, target: Target, body: dict,
               result: RequestResult) -> RequestResult:
    """POST ``body`` and stream the answer into ``result`` (mutated and returned)."""
    path = "/v1/chat/completions" if target.endpoint == "chat" else "/v1/completions"
    sent = time.perf_counter()
    try:
        async with client.stream("POST", target.base_url + path, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                result.error = f"http {resp.status_code}: {text[:300]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter() - sent
                obj = json.loads(data)
                if "error" in obj:
                    result.error = f"stream error: {json.dumps(obj['error'])[:300]}"
                    break
                if obj.get("usage"):
                    result.num_prompt_tokens = obj["usage"]["prompt_tokens"]
                    result.num_output_tokens = obj["usage"]["completion_tokens"]
                if any(_chunk_text(c) for c in obj.get("choices") or ()):
                    result.token_times_s.append(now)
        result.e2e_s = time.perf_counter() - sent
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    if result.error is None and not result.num_output_tokens:  # no usage chunk
        result.num_output_tokens = len(result.token_times_s)
    return result


async def run_workload(target: Target, specs: list[RequestSpec], bodies: list[dict],
                       max_concurrency: int | None = None, desc: str = "requests",
                       progress: bool = True) -> tuple[list[RequestResult], float]:
    """Send ``bodies[i]`` at ``specs[i].arrival_s``; returns the results in spec order and
    the run's duration (start to the last answer's end)."""
    from tqdm.auto import tqdm

    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    # idle connections expire before uvicorn's 5 s keep-alive closes them under us
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None,
                          keepalive_expiry=2.0)
    timeout = httpx.Timeout(target.timeout_s, connect=30.0)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(specs), desc=desc, unit="req", disable=not progress, leave=False)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:
        start = time.perf_counter()

        async def one(i: int, spec: RequestSpec, body: dict) -> RequestResult:
            delay = spec.arrival_s - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            if gate is not None:
                await gate.acquire()
            try:
                result = RequestResult(i, spec.arrival_s, time.perf_counter() - start,
                                       len(spec.prompt_token_ids),
                                       num_requested_output_tokens=spec.num_output_tokens)
                return await send(client, target, body, result)
            finally:
                if gate is not None:
                    gate.release()
                bar.update(1)

        results = await asyncio.gather(*(one(i, s, b) for i, (s, b)
                                         in enumerate(zip(specs, bodies, strict=True))))
        duration = time.perf_counter() - start
    bar.close()
    return list(results), duration
