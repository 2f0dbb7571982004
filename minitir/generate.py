"""KV-cached, continuously batched generation with tool calls that resume on the same cache (ZeroTIR).

`Engine` holds what outlives a call: the KV cache (one row per sequence being generated) and, on CUDA, the
decode step's graphs. Each `generate` call is a `Generation`: its sequences and their schedule. A sequence
owns one cache row and moves through explicit states:

    WAITING --admitted to a free row--> PREFILL, or COPY (a sibling is caching the same prompt: the n
            responses of a GRPO group share theirs) --its cached prompt copied--> DECODE
    PREFILL --its pending tokens cached, a token sampled--> DECODE
    DECODE  --a token sampled--> DECODE | IN_TOOL (a ```python block closed) | FINISHED (EOS, stop, length)
    IN_TOOL --output block spliced in--> PREFILL (only the output block is prefilled, then decoding resumes;
            reprefill_after_tool, the peers' way kept for a benchmark: the whole prefix again)

`pending` has one meaning throughout: the sequence's tokens not yet in its cache row, always
prompt + tokens == the row's cached tokens + pending. A sampled token is pending until the next forward
caches it (and samples the next one from its logits), so the row never holds a token whose successor is
unknown; an output block joins the pending token, and the prefill that caches both samples what follows.

`Generation.step()` is one tick of a logical clock: admit waiting sequences, take back the tool calls whose
turn has come, prefill every PREFILL row in one batch under a token budget (longer inputs in chunks), copy
the prompts of COPY rows, decode one token for every DECODE row, and retire finished rows. A code block that
closes at tick t runs (in the sandbox's queue, or on threads for a plain function: tool_protocol.py) while the
other sequences decode tool_lag more tokens; its sequence takes the result back at tick t + tool_lag + 1,
waiting for it then if need be (or earlier, when nothing else can run): never "whenever the run is done", so
which rows decode and prefill together depends on the tokens alone, not on how fast the sandbox was, and the
same seed gives the same run.
Token-in/token-out: sampled tokens are kept as ids; text is decoded for stop checks and display only.
"""
from __future__ import annotations

import enum
import warnings
from collections import deque
from dataclasses import dataclass, field

import torch

from minitir.attention import cache_dtype, cache_length, flash_available
from minitir.model import KVCache, Transformer
from minitir.ops import keep_freed_memory
from minitir.sample import Completion
from minitir.sampling import sample
from minitir.tool_protocol import ToolOutput, ToolProtocol


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
    tool_workers: int = 8      # threads for a tool without submit(); a sandbox's own workers run its queue
    tool_lag: int = 4          # ticks the other rows decode while a row's code runs; then the row takes its result
    reprefill_after_tool: bool = False  # the peer frameworks' behaviour, kept for the benchmark baseline
    ignore_eos: bool = False   # generate max_new_tokens whatever is sampled (benchmarks)
    cuda_graphs: bool = True   # on CUDA with a FlashAttention kernel: replay the decode step as a CUDA graph


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILL = "prefill"
    COPY = "copy"
    DECODE = "decode"
    IN_TOOL = "in_tool"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    idx: int
    prompt: list[int]
    gen: torch.Generator | None
    status: Status = Status.WAITING
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # tokens not yet in its cache row (see the module docstring)
    row: int = -1
    cached: int = 0          # tokens of this sequence in its cache row
    segment_start: int = 0   # index in tokens where the current policy segment (after the last tool output) starts
    tool_calls: int = 0
    tool_errors: int = 0
    tool_failures: int = 0
    tool_timeouts: int = 0
    finish: str | None = None
    future: object = None    # the running tool call
    due: int = 0             # the tick at which the engine takes its result
    donor: "Sequence | None" = None   # COPY: the active sequence with the same prompt whose cached prompt it copies

    def end(self, reason: str):
        self.finish, self.status = reason, Status.FINISHED

    def completion(self, tok) -> Completion:
        return Completion(tokens=self.tokens, logprobs=self.logprobs, policy_mask=self.mask,
                          finish_reason=self.finish, text=tok.decode(self.tokens),
                          num_tool_calls=self.tool_calls, num_tool_errors=self.tool_errors,
                          num_tool_failures=self.tool_failures, num_tool_timeouts=self.tool_timeouts,
                          policy_text=tok.decode([t for t, m in zip(self.tokens, self.mask) if m]))


def _graphs_supported(model: Transformer, device: torch.device, dtype: torch.dtype) -> bool:
    """CUDA graphs need a decode step without host syncs: a FlashAttention kernel, flash-attn's or torch's
    (block_attention, the batch-invariant kernel, reads lengths on the host)."""
    return not getattr(model, "batch_invariant", False) and flash_available(torch.empty(0, dtype=dtype, device=device))


class DecodeGraphs:
    """The decode step (one token for each of B rows -> logits [B, V]) as CUDA graphs, one per batch
    size in `sizes`. Launching a small model's ~15 kernels per layer one by one from Python bounds
    decoding on a GPU; a graph replays them in one launch.

    A graph reads its inputs from static buffers and writes its logits to a static output. A batch of B
    rows runs the smallest graph of at least B; its spare entries decode into a scratch row (the cache's
    last, which the engine never hands out), whose length is reset at the end of every step. Each
    graph's logits stay allocated until the engine's release() (Qwen's vocabulary at max_batch 256: ~0.7 GB).
    Off CUDA the same buffers and padding run eagerly (so tests check everything but the capture)."""

    def __init__(self, model: Transformer, cache: KVCache, max_rows: int):
        self.model, self.cache = model, cache
        self.scratch = cache.k.shape[1] - 1
        dev = cache.k.device
        self.ids = torch.zeros(max_rows, 1, dtype=torch.long, device=dev)
        self.row_ids = torch.full((max_rows,), self.scratch, dtype=torch.int32, device=dev)
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
        logits = self.model.forward_cached(self.ids[:b], self.cache, self.row_ids[:b], check=False)
        self.cache.seqlens[self.scratch] = 0
        return logits

    def __call__(self, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """ids [B, 1], rows [B] -> logits [B, V]: a view of the graph's output, valid until the next call."""
        B = ids.shape[0]
        b = next(n for n in self.sizes if n >= B)
        self.ids[:B].copy_(ids)
        self.row_ids[:B].copy_(rows)
        self.row_ids[B:b].fill_(self.scratch)
        if b not in self.graphs:
            return self._step(b)[:B]
        self.graphs[b].replay()
        return self.out[b][:B]


class Engine:
    """Generates completions for lists of prompts (token ids) with one model, tokenizer and tool, each `generate`
    call under its own GenerationConfig. The KV cache and its CUDA graphs are kept from one call to the next
    (refill rounds, evaluations) while they are large enough, and grow to cover both calls when not: a graph
    reads the model's weights at their addresses, so weights updated in place between calls (an optimizer
    step, Learner.decoder's refreshed copy) are replayed with their new values, but weights given new storage
    (`model.to(...)`) need a new engine. release() frees both, e.g. before an update needs the memory."""

    def __init__(self, model: Transformer, tokenizer, tool=None):
        self.model, self.tok, self.tool = model, tokenizer, tool
        if torch.device(model.device).type == "cpu":
            keep_freed_memory()
        self.cache, self.graphs = None, None
        self.capacity = 0             # cache rows for sequences (a graph's scratch row aside)
        self.captures = 0             # DecodeGraphs built by this engine (each one captures every batch size)
        self.graphs_failed = False    # a capture failed: this engine decodes without graphs from then on

    def generate(self, prompts: list[list[int]], config: GenerationConfig, progress=None) -> list[Completion]:
        """-> a completion per prompt. progress(n), when given, is called as n more sequences finish (a bar)."""
        if not prompts:
            return []
        run = Generation(self, prompts, config, progress or (lambda n: None))
        try:
            while run.waiting or run.active:
                run.step()
        finally:
            if run.tools is not None:
                run.tools.close()
        return [s.completion(self.tok) for s in run.seqs]

    def release(self):
        """Frees the KV cache and the graphs (which hold the cache and their memory pool)."""
        self.cache, self.graphs, self.capacity = None, None, 0

    def allocate(self, rows: int, max_len: int, cfg: GenerationConfig) -> bool:
        """A KV cache of at least `rows` rows of max_len tokens (+ a scratch row for CUDA graphs) and the graphs,
        where the device can capture them; the last call's are kept when they suffice. -> decode with graphs."""
        dev = torch.device(self.model.device)
        # under autocast the attention inputs are in the autocast dtype, and so must the cache be (CPUs: cache_dtype)
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else self.model.dtype
        dtype = cache_dtype(dtype, dev)
        graphs = cfg.cuda_graphs and not self.graphs_failed and _graphs_supported(self.model, dev, dtype)
        length = cache_length(max_len, torch.empty(0, dtype=dtype, device=dev))
        kept = self.cache
        if kept is None or kept.k.dtype != dtype or kept.max_len < length or self.capacity < rows or \
                (graphs and self.graphs is None):
            size = rows
            if kept is not None and kept.k.dtype == dtype:   # grow to cover this call and the last: no ping-pong
                size, length = max(rows, self.capacity), max(length, kept.max_len)
            self.release()
            self.cache = KVCache(self.model.config, size + int(graphs), length, dtype=dtype, device=dev)
            self.capacity = size
            if graphs:
                self._capture()
        return graphs and self.graphs is not None

    def _capture(self):
        self.captures += 1
        try:
            self.graphs = DecodeGraphs(self.model, self.cache, self.capacity)
        except Exception as e:  # decoding still works without them, only slower
            self.graphs_failed = True
            warnings.warn(f"CUDA-graph capture of the decode step failed ({type(e).__name__}: {e}); decoding "
                          f"without graphs from now on (GenerationConfig.cuda_graphs=False skips the attempt)")


class Generation:
    """One `Engine.generate` call: its sequences, their schedule and its tool calls, on the engine's cache."""

    def __init__(self, engine: Engine, prompts: list[list[int]], cfg: GenerationConfig, progress):
        self.model, self.tok, self.cfg, self.progress = engine.model, engine.tok, cfg, progress
        eos = self.model.config.eos_token_id if self.model.config.eos_token_id is not None else self.tok.eos_token_id
        self.eos = set() if cfg.ignore_eos else set(eos if isinstance(eos, list) else [eos]) - {None}
        # a stop string of c characters spans at most 4c tokens (byte-level tokens of a 4-byte character)
        self.window = 4 * max([len(st) for st in cfg.stop] + [len("```")]) + 4
        self.max_len = cfg.max_len or (max(len(p) for p in prompts) + cfg.max_new_tokens)
        stream = lambda i: None if cfg.seed is None else torch.Generator(device=self.model.device).manual_seed(
            cfg.seed * 1_000_003 + cfg.seed_offset + i)   # one sampling stream per response
        self.seqs = [Sequence(idx=i, prompt=list(p), gen=stream(i)) for i, p in enumerate(prompts)]
        for s in self.seqs:
            if not s.prompt or len(s.prompt) >= self.max_len:
                s.end("prompt_too_long" if s.prompt else "stop")
        self.waiting = deque(s for s in self.seqs if s.status is Status.WAITING)
        self.active: list[Sequence] = []
        self.progress(len(self.seqs) - len(self.waiting))   # prompts that ended before generating
        rows = min(cfg.max_batch, len(prompts))
        self.use_graphs = engine.allocate(rows, self.max_len, cfg)
        self.cache, self.graphs = engine.cache, engine.graphs
        self.free = list(range(rows - 1, -1, -1))   # this call's rows, however many the cache has
        self.tools = ToolProtocol(self.tok, engine.tool, cfg) if engine.tool is not None and cfg.max_tool_calls > 0 \
            else None
        self.clock = 0

    def step(self):
        """One tick of the engine: schedule, run, post-process."""
        self._admit()
        self._take_tool_results()
        self._prefill([s for s in self.active if s.status is Status.PREFILL])
        self._copy_prompts([s for s in self.active if s.status is Status.COPY])
        self._decode([s for s in self.active if s.status is Status.DECODE])
        self.clock += 1
        done = [s for s in self.active if s.status is Status.FINISHED]
        for s in done:
            self.active.remove(s)
            self.free.append(s.row)
        if done:
            self.progress(len(done))

    def _take_tool_results(self):
        """Splice in the results of the tool calls due at this tick, waiting for any still running. When every
        active row waits for a tool, the clock jumps to the earliest due tick (nothing else could run)."""
        parked = [s for s in self.active if s.status is Status.IN_TOOL]
        if not parked:
            return
        if len(parked) == len(self.active):
            self.clock = max(self.clock, min(s.due for s in parked))
        for s in sorted((s for s in parked if s.due <= self.clock), key=lambda s: (s.due, s.idx)):
            out, s.future = self.tools.result(s.future), None
            self._splice(s, out)

    def _admit(self):
        """Waiting sequences into free rows: COPY where a sibling is caching or has cached the same prompt (see
        _copy_prompts), else PREFILL, or DECODE for a one-token prompt (its token is all there is to cache)."""
        while self.waiting and self.free:
            s = self.waiting.popleft()
            s.row, s.cached, s.pending = self.free.pop(), 0, list(s.prompt)
            self.cache.seqlens[s.row] = 0
            if len(s.prompt) > 1:
                s.donor = next((t for t in self.active if t.prompt == s.prompt and t.status is not Status.COPY), None)
            s.status = Status.COPY if s.donor else Status.PREFILL if len(s.prompt) > 1 else Status.DECODE
            self.active.append(s)

    def _copy_prompts(self, seqs: list[Sequence]):
        """The n responses of a GRPO group share their prompt: it is prefilled once, and each sibling copies
        the donor's cached keys/values of all but the prompt's last token, which it then decodes itself, so
        it samples its first token from its own logits and generator. A sibling is admitted in the tick it
        copies in, after that tick's prefill, which caches every PREFILL row's whole input (chunk by chunk):
        its donor's row holds the prompt, and the donor stays active until the tick's end."""
        cache = self.cache
        for s in seqs:
            d, n = s.donor, len(s.prompt) - 1
            cache.k[:, s.row, :n] = cache.k[:, d.row, :n]
            cache.v[:, s.row, :n] = cache.v[:, d.row, :n]
            cache.seqlens[s.row], s.cached = n, n
            s.donor, s.pending, s.status = None, s.prompt[-1:], Status.DECODE

    def _prefill(self, seqs: list[Sequence]):
        """Every row's pending tokens into its cache, in batches under the token budget (right padding is
        written past each row's length, so the longest input must fit every row of its batch); rows whose
        whole input is now cached sample their next token."""
        budget = self.cfg.prefill_tokens
        while seqs:
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
            logits = self.model.forward_cached(ids.to(self.model.device), self.cache,
                                               torch.tensor([s.row for s, _ in batch]),
                                               torch.tensor([n for _, n in batch]))
            done = [(b, s) for b, (s, n) in enumerate(batch) if n == len(s.pending)]
            partial = [s for s, n in batch if n < len(s.pending)]   # a chunked prefill continues next round
            for s, n in batch:
                s.pending, s.cached = s.pending[n:], s.cached + n
            if done:
                self._sampled(logits[[b for b, _ in done]], [s for _, s in done])
            seqs = partial + seqs

    def _decode(self, seqs: list[Sequence]):
        """One token for each row: its pending token into the cache, the next one sampled."""
        if not seqs:
            return
        seqs = sorted(seqs, key=lambda s: s.row)  # contiguous rows let the cache be read without a copy
        ids = torch.tensor([[s.pending[0]] for s in seqs], device=self.model.device)
        rows = torch.tensor([s.row for s in seqs], dtype=torch.int32, device=self.model.device)
        logits = self.graphs(ids, rows) if self.use_graphs else self.model.forward_cached(ids, self.cache, rows)
        for s in seqs:
            s.cached += 1
        self._sampled(logits, seqs)

    def _sampled(self, logits: torch.Tensor, seqs: list[Sequence]):
        """logits [B, V] of the rows' last cached token -> each row's next token, then its checks: EOS, stop
        strings, the length limit, a closed code block (the tool protocol parks it)."""
        c = self.cfg
        toks, lps = sample(logits, [s.gen for s in seqs], c.temperature, c.top_k, c.top_p)
        for s, tok, lp in zip(seqs, toks, lps):
            s.tokens.append(tok)
            s.logprobs.append(lp)
            s.mask.append(1)
            s.pending, s.status = [tok], Status.DECODE
            if tok in self.eos:
                s.end("stop")
                continue
            watch = self.tools is not None and s.tool_calls < c.max_tool_calls
            tail = (self.tok.decode(s.tokens[max(s.segment_start, len(s.tokens) - self.window):])
                    if c.stop or watch else "")
            if any(st in tail for st in c.stop):
                s.end("stop")
            elif len(s.tokens) >= c.max_new_tokens or len(s.prompt) + len(s.tokens) >= self.max_len:
                s.end("length")
            elif watch and (code := self.tools.code(s.tokens[s.segment_start:], tail)) is not None:
                # the block is handled: the next segment starts after it
                s.tool_calls, s.segment_start, s.status = s.tool_calls + 1, len(s.tokens), Status.IN_TOOL
                s.future, s.due = self.tools.submit(code), self.clock + c.tool_lag + 1   # after tool_lag more ticks

    def _splice(self, s: Sequence, out: ToolOutput):
        """A tool's output into the sequence as an output block (policy mask 0, log-prob 0); its tokens are
        prefilled into the same cache row after the last sampled token, which is not cached yet."""
        c = self.cfg
        s.tool_errors += out.error
        s.tool_failures += out.failed
        s.tool_timeouts += out.timeout
        toks = self.tools.output_tokens(s.tokens[-1:], out, min(c.max_new_tokens - len(s.tokens),
                                                    self.max_len - len(s.prompt) - len(s.tokens)))
        s.tokens += toks
        s.logprobs += [0.0] * len(toks)
        s.mask += [0] * len(toks)
        s.segment_start = len(s.tokens)
        if c.reprefill_after_tool:   # the peer frameworks' way: the whole prefix again
            self.cache.seqlens[s.row], s.cached = 0, 0
            s.pending = s.prompt + s.tokens
        else:
            s.pending = s.pending + toks
        s.status = Status.PREFILL if len(s.pending) > 1 else Status.DECODE
        if len(s.tokens) >= c.max_new_tokens or len(s.prompt) + len(s.tokens) >= self.max_len:
            s.end("length")


def generate(model: Transformer, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, tool=None,
             **kwargs) -> list[Completion]:
    """A completion for each prompt (a list of token ids); kwargs are GenerationConfig's other fields."""
    return Engine(model, tokenizer, tool).generate(prompts, GenerationConfig(max_new_tokens=max_new_tokens, **kwargs))
