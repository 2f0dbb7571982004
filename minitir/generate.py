"""KV-cached, continuously batched generation with tool-call interruption and resume (ZeroTIR).

Each sequence owns one row of a preallocated `KVCache`. Every tick of the engine:
  1. admits waiting prompts into free rows (a prompt already cached in a sibling's row, as the n responses
     of a GRPO group are, is copied from there instead of prefilled again);
  2. takes the finished tool calls and queues their output tokens;
  3. prefills every row with more than one queued token (new prompts, tool outputs) in one batch,
     bounded by a token budget (longer inputs go in chunks);
  4. decodes one token for every row with exactly one queued token;
  5. checks each new token for EOS, stop strings, length limits and a closed ```python block.
A closed code block parks the sequence and sends its code to the tool on a thread pool; the others keep
decoding. The output comes back as an ```output block whose tokens are prefilled into the same cache
row: nothing before it is recomputed. Tool tokens carry policy_mask 0 and log-prob 0.

Token-in/token-out: sampled tokens are kept as ids; text is decoded for stop checks and display only.
"""
from __future__ import annotations

import re
import warnings
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from minitir.attention import cache_length, flash_available
from minitir.model import KVCache, Transformer
from minitir.ops import packed_weights

CODE_BLOCK = re.compile(r"```python[^\n]*\n(.*?)```", re.DOTALL)
OUTPUT_TAIL = "\n```\n\n\n"   # the paper's output-block ending (math_tir_process_single_request.py)
TOO_LONG = "The output of the code execution is too long, please check your code."   # the paper's message


@dataclass
class ToolOutput:
    text: str
    error: bool = False


@dataclass
class Completion:
    tokens: list[int]          # everything after the prompt: sampled tokens and tool-output tokens
    logprobs: list[float]      # log p(token) under softmax(logits / temperature); 0 for tool tokens
    policy_mask: list[int]     # 1 = sampled by the policy, 0 = inserted by the tool
    text: str
    finish_reason: str         # "stop" (EOS or stop string), "length", "prompt_too_long"
    num_tool_calls: int = 0
    num_tool_errors: int = 0
    policy_text: str = ""      # the model's own text: the policy tokens alone, tool output left out


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 1.0   # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    seed_offset: int = 0       # index of prompts[0] in a larger batch split across processes
    max_tool_calls: int = 0
    max_tool_output_tokens: int = 256  # a whole output block over this many tokens is replaced (or cut)
    tool_output_overflow: str = "replace"  # replace: the paper's "too long" message | truncate: keep the start
    max_batch: int = 32        # rows of the KV cache = sequences decoded at once
    max_len: int | None = None # tokens per row (prompt + response); default: longest prompt + max_new_tokens
    prefill_tokens: int = 4096 # token budget of one prefill batch
    tool_workers: int = 8
    reprefill_after_tool: bool = False  # the peer frameworks' behaviour, kept for the benchmark baseline
    ignore_eos: bool = False   # generate max_new_tokens whatever is sampled (benchmarks)
    cuda_graphs: bool = True   # on CUDA with flash-attn: replay the decode step as a CUDA graph


@dataclass(eq=False)
class _Seq:
    idx: int
    prompt: list[int]
    gen: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # tokens not yet in the cache
    row: int = -1
    cached: int = 0          # tokens of this sequence in its cache row
    segment_start: int = 0   # index in tokens where the current policy segment (after the last tool output) starts
    tool_calls: int = 0
    tool_errors: int = 0
    finish: str | None = None
    future: Future | None = None
    donor: _Seq | None = None  # an active sequence with the same prompt, whose cached prompt this one copies


def _graphs_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """CUDA graphs need a decode step without host syncs: a FlashAttention kernel, flash-attn's or torch's
    (the PyTorch stand-in reads lengths on the host)."""
    return flash_available(torch.empty(0, dtype=dtype, device=device))


class DecodeGraphs:
    """The decode step (one token for each of B rows -> logits [B, V]) as CUDA graphs, one per batch
    size in `sizes`. Launching a small model's ~15 kernels per layer one by one from Python bounds
    decoding on a GPU; a graph replays them in one launch.

    A graph reads its inputs from static buffers and writes its logits to a static output. A batch of B
    rows runs the smallest graph of at least B; its spare entries decode into a scratch row (the cache's
    last, which the engine never hands out), whose length is reset at the end of every step. Each
    graph's logits stay allocated while generate runs (Qwen's vocabulary at max_batch 256: ~0.7 GB).
    Off CUDA the same buffers and padding run eagerly (so tests check everything but the capture)."""

    def __init__(self, model: Transformer, cache: KVCache, max_rows: int):
        self.model, self.cache = model, cache
        self.scratch = cache.k.shape[1] - 1
        dev = cache.k.device
        self.ids = torch.zeros(max_rows, 1, dtype=torch.long, device=dev)
        self.rows = torch.full((max_rows,), self.scratch, dtype=torch.int32, device=dev)
        self.sizes = sorted({min(b, max_rows) for b in (1, 2, 4, 8, *range(16, max_rows + 16, 16))})
        self.graphs, self.out, pool = {}, {}, None
        if dev.type != "cuda":
            return
        # under autocast, casts made during capture must not be cached outside the graph's memory
        amp = torch.is_autocast_enabled("cuda")
        with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=amp, cache_enabled=False):
            for b in reversed(self.sizes):   # largest first: the smaller graphs reuse its memory pool
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):   # warm-up: library handles and workspaces exist before capture
                    self._step(b)
                torch.cuda.current_stream().wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self.out[b] = self._step(b)
                self.graphs[b], pool = g, g.pool()

    def _step(self, b: int) -> torch.Tensor:
        logits = self.model.forward_cached(self.ids[:b], self.cache, self.rows[:b], check=False)
        self.cache.seqlens[self.scratch] = 0
        return logits

    def __call__(self, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """ids [B, 1], rows [B] -> logits [B, V]: a view of the graph's output, valid until the next call."""
        B = ids.shape[0]
        b = next(n for n in self.sizes if n >= B)
        self.ids[:B].copy_(ids)
        self.rows[:B].copy_(rows)
        self.rows[B:b].fill_(self.scratch)
        if b not in self.graphs:
            return self._step(b)[:B]
        self.graphs[b].replay()
        return self.out[b][:B]


def _to_tool_output(r) -> ToolOutput:
    if isinstance(r, ToolOutput):
        return r
    if isinstance(r, tuple):
        return ToolOutput(str(r[0]), bool(r[1]))
    if isinstance(r, str):
        return ToolOutput(r)
    return ToolOutput(r.text, bool(getattr(r, "error", False)))


class Generator:
    def __init__(self, model: Transformer, tokenizer, config: GenerationConfig, tool=None):
        self.model, self.tok, self.cfg, self.tool = model, tokenizer, config, tool
        eos = model.config.eos_token_id if model.config.eos_token_id is not None else tokenizer.eos_token_id
        self.eos = set() if config.ignore_eos else set(eos if isinstance(eos, list) else [eos]) - {None}
        # a stop string of c characters spans at most 4c tokens (byte-level tokens of a 4-byte character)
        longest = max([len(s) for s in config.stop] + [len("```")])
        self.window = 4 * longest + 4

    # --- sampling ---------------------------------------------------------------------------------
    def _sample(self, logits: torch.Tensor, seqs: list[_Seq]) -> tuple[list[int], list[float]]:
        """logits [B, V] -> sampled ids and their log-probs under softmax(logits / T) (T=1 when greedy)."""
        c = self.cfg
        logits = logits.float()
        t = c.temperature if c.temperature > 0 else 1.0
        logp = torch.log_softmax(logits / t, dim=-1)                               # [B, V]
        if c.temperature <= 0:
            ids = logits.argmax(-1)
        else:
            filt = logp                                                            # filtered copies below
            if c.top_k > 0:
                kth = torch.topk(filt, min(c.top_k, filt.shape[-1]), dim=-1).values[:, -1:]
                filt = filt.masked_fill(filt < kth, float("-inf"))
            if c.top_p < 1.0:
                if c.top_k > 0:
                    filt = filt.log_softmax(-1)  # top-p measures the mass of what top-k kept (as HF and vLLM do)
                # keep the smallest prefix, by probability, whose mass reaches top_p. Sorting the whole
                # vocabulary dominated a sampling step: take the k most likely tokens instead, k growing
                # until their mass exceeds top_p in every row, so that nothing past them can be kept.
                k = min(64, filt.shape[-1])
                while True:
                    top_lp, order = filt.topk(k, dim=-1)                           # [B, k], descending
                    probs = top_lp.exp()
                    cum = probs.cumsum(-1)
                    if k == filt.shape[-1] or bool((cum[:, -1] > c.top_p).all()):
                        break
                    k = min(4 * k, filt.shape[-1])
                drop = cum - probs > c.top_p                                       # mass before the token
                filt = torch.full_like(filt, float("-inf")).scatter(-1, order, top_lp.masked_fill(drop, float("-inf")))
            # Gumbel-max: argmax_i (log p_i - log(-log u_i)) is i with probability p_i (-log u_i ~ Exp(1): the
            # exponential race torch.multinomial runs too). Each sequence draws its uniforms from its own
            # generator, so its samples do not depend on which others share the batch; the race changes its
            # winner only on a near-tie, so neither do last-bit logit differences between batch sizes (an
            # inverse CDF would sum them over the vocabulary). The logs run batched over [B, V]: one
            # multinomial per row spent a fifth of a decode step at batch 16 drawing its exponentials.
            u = torch.empty_like(filt)                                             # [B, V]
            for b, s in enumerate(seqs):
                u[b].uniform_(generator=s.gen)
            ids = (filt - u.log_().neg_().log_()).argmax(-1)                       # u = 0 gives -inf: never picked
        return ids.tolist(), logp.gather(-1, ids[:, None]).squeeze(-1).tolist()

    # --- per-token checks -------------------------------------------------------------------------
    def _after_token(self, s: _Seq, tok: int, lp: float, pool: ThreadPoolExecutor | None):
        s.tokens.append(tok)
        s.logprobs.append(lp)
        s.mask.append(1)
        s.pending = [tok]
        if tok in self.eos:
            s.finish = "stop"
            return
        watch_code = pool is not None and s.tool_calls < self.cfg.max_tool_calls
        tail = (self.tok.decode(s.tokens[max(s.segment_start, len(s.tokens) - self.window):])
                if self.cfg.stop or watch_code else "")
        if any(st in tail for st in self.cfg.stop):
            s.finish = "stop"
            return
        if len(s.tokens) >= self.cfg.max_new_tokens or len(s.prompt) + len(s.tokens) >= self.max_len:
            s.finish = "length"
            return
        if watch_code and "```" in tail:
            segment = self.tok.decode(s.tokens[s.segment_start:])
            blocks = list(CODE_BLOCK.finditer(segment))
            if blocks:
                s.tool_calls += 1
                s.future = pool.submit(self.tool.run if hasattr(self.tool, "run") else self.tool, blocks[-1].group(1))
                s.segment_start = len(s.tokens)  # this block is handled; the next segment starts after it

    def _tool_tokens(self, s: _Seq, out: ToolOutput) -> list[int]:
        """The output block's tokens in the paper's layout ("\\n```output\\n" + result + "\\n```\\n\\n\\n"; the
        leading newline only when the model's text does not end with one). A block over max_tool_output_tokens
        is replaced by the paper's message (tool_output_overflow="replace") or cut ("truncate"); then the
        block is cut to the room left in the response."""
        c = self.cfg
        enc = lambda x: self.tok.encode(x, add_special_tokens=False)
        head = ("" if self.tok.decode(s.tokens[-1:]).endswith("\n") else "\n") + "```output\n"
        toks = enc(head + out.text.rstrip("\n") + OUTPUT_TAIL)
        if len(toks) > c.max_tool_output_tokens:
            if c.tool_output_overflow == "replace":
                toks = enc(head + TOO_LONG + OUTPUT_TAIL)
            else:
                note, tail = enc("\n... (output truncated)"), enc(OUTPUT_TAIL)
                keep = max(c.max_tool_output_tokens - len(note) - len(tail), 0)
                toks = toks[:keep] + note + tail
        room = min(c.max_new_tokens - len(s.tokens), self.max_len - len(s.prompt) - len(s.tokens))
        return toks[:max(room, 0)]

    # --- the engine -------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]]) -> list[Completion]:
        c, model = self.cfg, self.model
        if not prompts:
            return []
        self.max_len = c.max_len or (max(len(p) for p in prompts) + c.max_new_tokens)
        rows = min(c.max_batch, len(prompts))
        dev = torch.device(model.device)
        # under autocast the attention inputs are in the autocast dtype, and so must the cache be
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else model.dtype
        graphs = c.cuda_graphs and _graphs_supported(dev, dtype)
        cache = KVCache(model.config, rows + int(graphs), cache_length(self.max_len, torch.empty(0, dtype=dtype, device=dev)),
                        dtype=dtype, device=dev)  # + a scratch row
        self.graphs = None
        if graphs:
            try:
                self.graphs = DecodeGraphs(model, cache, rows)
            except RuntimeError as e:  # decoding still works without them, only slower
                warnings.warn(f"CUDA-graph capture of the decode step failed ({e}); decoding without graphs "
                              f"(GenerationConfig.cuda_graphs=False skips the attempt)")
        seqs = []
        for i, p in enumerate(prompts):
            gen = None
            if c.seed is not None:
                gen = torch.Generator(device=model.device).manual_seed(c.seed * 1_000_003 + c.seed_offset + i)
            seqs.append(_Seq(idx=i, prompt=list(p), gen=gen))
        waiting = deque()
        for s in seqs:
            if not s.prompt or len(s.prompt) >= self.max_len:
                s.finish = "prompt_too_long" if s.prompt else "stop"
            else:
                waiting.append(s)
        free = list(range(rows - 1, -1, -1))
        active: list[_Seq] = []
        pool = ThreadPoolExecutor(c.tool_workers) if (self.tool is not None and c.max_tool_calls > 0) else None
        try:
            with packed_weights():  # CPU: weights in oneDNN's layout for this call
                while waiting or active:
                    while waiting and free:
                        s = waiting.popleft()
                        s.row, s.cached = free.pop(), 0
                        cache.seqlens[s.row] = 0
                        if len(s.prompt) > 1:  # a sibling's prompt already in the cache is copied, not prefilled
                            s.donor = next((t for t in active if t.prompt == s.prompt and t.donor is None), None)
                        s.pending = [] if s.donor is not None else list(s.prompt)
                        active.append(s)
                    self._resume_tools(active, cache, block=all(s.future is not None for s in active))
                    ready = [s for s in active if s.future is None and s.finish is None]
                    self._prefill([s for s in ready if len(s.pending) > 1], cache, pool)
                    self._copy_prompts([s for s in active if s.donor is not None], active, cache)
                    self._decode([s for s in ready if len(s.pending) == 1 and s.finish is None
                                  and s.future is None], cache, pool)
                    for s in [s for s in active if s.finish is not None]:
                        active.remove(s)
                        free.append(s.row)
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            self.graphs = None  # they hold the cache and their memory pool: both go when generate returns
        return [Completion(tokens=s.tokens, logprobs=s.logprobs, policy_mask=s.mask, finish_reason=s.finish,
                           text=self.tok.decode(s.tokens), num_tool_calls=s.tool_calls, num_tool_errors=s.tool_errors,
                           policy_text=self.tok.decode([t for t, m in zip(s.tokens, s.mask) if m]))
                for s in seqs]

    def _copy_prompts(self, seqs: list[_Seq], active: list[_Seq], cache: KVCache):
        """The n responses of a GRPO group share their prompt: it is prefilled once, and each sibling copies
        the donor's cached keys/values of all but the prompt's last token, which it then decodes itself, so
        it samples its first token from its own logits and generator."""
        for s in seqs:
            d, n = s.donor, len(s.prompt) - 1
            if d not in active:  # the donor ended while re-prefilling (reprefill_after_tool): prefill after all
                s.donor, s.pending = None, list(s.prompt)
            elif d.cached >= n:  # its row holds the prompt (a chunked prefill may still be under way)
                cache.k[:, s.row, :n] = cache.k[:, d.row, :n]
                cache.v[:, s.row, :n] = cache.v[:, d.row, :n]
                cache.seqlens[s.row], s.cached = n, n
                s.donor, s.pending = None, s.prompt[-1:]

    def _resume_tools(self, active: list[_Seq], cache: KVCache, block: bool):
        waiting = [s for s in active if s.future is not None]
        if not waiting:
            return
        if block:  # nothing else to do: wait for the first tool to answer
            wait([s.future for s in waiting], return_when=FIRST_COMPLETED)
        for s in waiting:
            if not s.future.done():
                continue
            try:
                out = _to_tool_output(s.future.result())
            except Exception as e:  # a broken tool must not take the batch down
                out = ToolOutput(f"tool failed: {type(e).__name__}: {e}", error=True)
            s.future = None
            s.tool_errors += out.error
            toks = self._tool_tokens(s, out)
            s.tokens += toks
            s.logprobs += [0.0] * len(toks)
            s.mask += [0] * len(toks)
            s.segment_start = len(s.tokens)
            if self.cfg.reprefill_after_tool:
                cache.seqlens[s.row], s.cached = 0, 0
                s.pending = s.prompt + s.tokens
            else:
                s.pending = s.pending + toks  # the last sampled token is not in the cache yet
            if len(s.tokens) >= self.cfg.max_new_tokens or len(s.prompt) + len(s.tokens) >= self.max_len:
                s.finish = "length"

    def _prefill(self, seqs: list[_Seq], cache: KVCache, pool):
        budget = self.cfg.prefill_tokens
        while seqs:
            # right padding is written past each row's length: the longest input must fit every row
            batch, used, T, room = [], 0, 0, self.max_len
            for s in seqs:
                n = min(len(s.pending), budget)
                r = min(room, self.max_len - s.cached)
                if batch and (used + n > budget or max(T, n) > r):
                    break
                batch.append((s, n))
                used, T, room = used + n, max(T, n), r
            seqs = seqs[len(batch):]
            ids = torch.zeros(len(batch), T, dtype=torch.long)
            for b, (s, n) in enumerate(batch):
                ids[b, :n] = torch.tensor(s.pending[:n])
            logits = self.model.forward_cached(ids.to(self.model.device), cache,
                                               torch.tensor([s.row for s, _ in batch]),
                                               torch.tensor([n for _, n in batch]))
            done = [(b, s) for b, (s, n) in enumerate(batch) if n == len(s.pending)]
            partial = [s for s, n in batch if n < len(s.pending)]
            for s, n in batch:
                s.pending, s.cached = s.pending[n:], s.cached + n
            if done:  # rows whose whole input is now cached sample their next token
                toks, lps = self._sample(logits[[b for b, _ in done]], [s for _, s in done])
                for (_, s), t, lp in zip(done, toks, lps):
                    self._after_token(s, t, lp, pool)
            seqs = partial + seqs  # chunked prefill continues next round

    def _decode(self, seqs: list[_Seq], cache: KVCache, pool):
        if not seqs:
            return
        seqs = sorted(seqs, key=lambda s: s.row)  # contiguous rows let the cache be read without a copy
        ids = torch.tensor([[s.pending[0]] for s in seqs], device=self.model.device)
        rows = torch.tensor([s.row for s in seqs], dtype=torch.int32, device=self.model.device)
        logits = self.graphs(ids, rows) if self.graphs is not None else self.model.forward_cached(ids, cache, rows)
        toks, lps = self._sample(logits, seqs)
        for s, t, lp in zip(seqs, toks, lps):
            s.cached += 1
            self._after_token(s, t, lp, pool)


def generate(model: Transformer, tokenizer, prompts: list[list[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop=(), seed: int | None = None,
             tool=None, max_tool_calls: int = 0, **kwargs) -> list[Completion]:
    """Generate a completion for each prompt (a list of token ids). See GenerationConfig for kwargs."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                           stop=tuple(stop), seed=seed, max_tool_calls=max_tool_calls, **kwargs)
    return Generator(model, tokenizer, cfg, tool).generate(prompts)
