import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from minitir import attention, sampling
from minitir.checkpoint import embedded_checkpoint, load_model
from minitir.generate import GenerationConfig, generate
from minitir.sampling import sample
from minitir.sandbox.result import ExecResult
from minitir.tool_protocol import ToolOutput
from tests.conftest import make_hf_model


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(embedded_checkpoint())


def tiny(kind, tmp_path, vocab_size=97, seed=0):
    hf = make_hf_model(kind, seed=seed, vocab_size=vocab_size)
    hf.save_pretrained(tmp_path / kind)
    return hf, load_model(tmp_path / kind)


def hf_greedy(hf, prompt, n, eos):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                          pad_token_id=eos)[0, len(prompt):].tolist()
    return out[:out.index(eos) + 1] if eos in out else out


PROMPTS = [[5, 17, 33, 8, 41, 9, 12], [70, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [44]]


@pytest.mark.quick
@pytest.mark.parametrize("kind", ["qwen2-gqa-untied", "llama-gqa-tied"])
def test_greedy_batch_matches_transformers(kind, tmp_path, tok):
    hf, m = tiny(kind, tmp_path)
    outs = generate(m, tok, PROMPTS, max_new_tokens=20, temperature=0)
    for p, o in zip(PROMPTS, outs):
        ref = hf_greedy(hf, p, 20, m.config.eos_token_id)
        assert o.tokens == ref
        assert o.finish_reason == ("stop" if ref[-1] == m.config.eos_token_id else "length")
        assert o.policy_mask == [1] * len(o.tokens)


def test_greedy_smollm_batch_matches_transformers(smollm, smollm_hf):
    model, tk = smollm
    texts = ["The capital of France is", "def add(a, b):", "1, 2, 3, 4,", "Question: what is 7 times 6?\nAnswer:"]
    prompts = [tk(t).input_ids for t in texts]
    outs = generate(model, tk, prompts, max_new_tokens=24, temperature=0)
    for p, o in zip(prompts, outs):
        assert o.tokens == hf_greedy(smollm_hf, p, 24, tk.eos_token_id)


@pytest.mark.quick
def test_continuous_batching_with_few_rows_equals_one_at_a_time(tmp_path, tok):
    _, m = tiny("llama-gqa-tied", tmp_path)
    prompts = PROMPTS + [[7, 7, 7], [90, 1, 2, 3, 4]]
    together = generate(m, tok, prompts, max_new_tokens=15, temperature=0, max_batch=2, prefill_tokens=8)
    for p, o in zip(prompts, together):
        alone = generate(m, tok, [p], max_new_tokens=15, temperature=0)[0]
        assert o.tokens == alone.tokens and o.finish_reason == alone.finish_reason


class CountingModel:
    """Records how many tokens each forward_cached call appends."""

    def __init__(self, m):
        self.m, self.config, self.calls = m, m.config, []

    dtype = property(lambda self: self.m.dtype)
    device = property(lambda self: self.m.device)

    def forward_cached(self, ids, cache, rows, n_new=None, all_logits=False):
        self.calls.append(n_new.tolist() if n_new is not None else [ids.shape[1]] * ids.shape[0])
        return self.m.forward_cached(ids, cache, rows, n_new, all_logits)


@pytest.mark.quick
def test_group_prompts_are_prefilled_once(tmp_path, tok):
    """A GRPO group repeats its prompt: one row prefills it, its siblings copy the cached prefix."""
    _, m = tiny("llama-gqa-tied", tmp_path)
    a, b = PROMPTS[0], PROMPTS[2]
    prompts = [a, a, b, a, b, [44], [44]]
    model = CountingModel(m)
    outs = generate(model, tok, prompts, max_new_tokens=8, temperature=0)
    prefilled = sum(n for call in model.calls for n in call if n > 1)
    assert prefilled == len(a) + len(b)  # each distinct prompt once (one-token prompts go straight to decoding)
    for p, o in zip(prompts, outs):
        assert o.tokens == generate(m, tok, [p], max_new_tokens=8, temperature=0)[0].tokens
    # sampled: each sibling has its own first token and stream, and its log-probs are the model's
    outs = generate(m, tok, [a] * 6, max_new_tokens=6, temperature=1.0, seed=5)
    assert len({tuple(o.tokens) for o in outs}) > 1
    for o in outs:
        logp = torch.log_softmax(m(torch.tensor([a + o.tokens]))[0].detach(), -1)
        for i, (t, lp) in enumerate(zip(o.tokens, o.logprobs)):
            assert abs(lp - float(logp[len(a) + i - 1, t])) <= 1e-4
    # a copied row is independent of how rows are shared: the same samples with one row at a time
    alone = generate(m, tok, [a] * 6, max_new_tokens=6, temperature=1.0, seed=5, max_batch=1)
    assert [o.tokens for o in outs] == [o.tokens for o in alone]


@pytest.mark.quick
def test_seeded_sampling_is_reproducible_and_independent_of_batching(tmp_path, tok):
    _, m = tiny("qwen2-gqa-untied", tmp_path)
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=20, seed=7)
    a = generate(m, tok, PROMPTS, **kw)
    b = generate(m, tok, PROMPTS, max_batch=1, **kw)
    c = generate(m, tok, PROMPTS, **{**kw, "seed": 8})
    assert [o.tokens for o in a] == [o.tokens for o in b]
    assert [o.tokens for o in a] != [o.tokens for o in c]


# logits [2, 1, .5, 0, -1, -3]: at T=1, p = .561 .206 .125 .076 .028 .004 (cumulative .561 .767 .892 ...).
# top_k=3 keeps {0, 1, 2}; top_p=0.7 keeps the smallest prefix reaching 0.7: {0, 1}; at T=2, top_p=0.5
# keeps {0, 1} (p = .363 .220 .172 ...); each kept set is renormalised. top_k=4 then top_p=0.78: top-p
# measures the top 4's renormalised mass (.579 .213 .129 .078, so .792 before token 2) and keeps {0, 1},
# where the unrenormalised mass (.767 before token 2) would have kept token 2 too.
@pytest.mark.parametrize("temperature,top_k,top_p,kept", [(1.0, 0, 1.0, [0, 1, 2, 3, 4, 5]), (1.0, 3, 1.0, [0, 1, 2]),
                                                         (1.0, 0, 0.7, [0, 1]), (2.0, 0, 0.5, [0, 1]),
                                                         (1.0, 4, 0.78, [0, 1])])
@pytest.mark.quick
def test_sampling_follows_the_filtered_distribution(temperature, top_k, top_p, kept):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 4000
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(n)]   # one stream per row
    ids, lps = sample(logits.repeat(n, 1), gens(), temperature, top_k, top_p)
    logp = torch.log_softmax(logits / temperature, -1)
    assert set(ids) <= set(kept)
    expected = logp[kept].exp() / logp[kept].exp().sum()
    for k, p in zip(kept, expected.tolist()):
        freq = ids.count(k) / n
        assert abs(freq - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-3, (k, freq, p)
    # the reported log-prob is that of the distribution sampled from: the kept set, renormalised
    sampled = dict(zip(kept, expected.log().tolist()))
    assert max(abs(lp - sampled[i]) for i, lp in zip(ids, lps)) < 1e-6
    again, _ = sample(logits.repeat(n, 1), gens(), temperature, top_k, top_p)
    assert again == ids


@pytest.mark.parametrize("head", [2, 128])
def test_gumbel_max_with_a_tail_follows_the_distribution(monkeypatch, head):
    """400 tokens, a fifth filtered out: with noise for the 2 (or 128) most likely only, the tail's tokens
    are drawn when the tail wins; frequencies match the renormalised probabilities in bins of 40 tokens and
    for each of the first 8, and a row's sample depends on its generator alone."""
    monkeypatch.setattr(sampling, "HEAD", head)
    logits = torch.linspace(0.0, -3.0, 400)
    logits[::5] = float("-inf")
    n = 20000
    gens = lambda k: [torch.Generator().manual_seed(i) for i in range(k)]
    ids = torch.tensor(sampling.gumbel_max(logits.repeat(n, 1), gens(n)).tolist())
    p = torch.softmax(logits, -1)
    freq = torch.bincount(ids, minlength=400).float() / n
    assert freq[::5].sum() == 0
    for f, q in [(freq[i:i + 40].sum(), p[i:i + 40].sum()) for i in range(0, 400, 40)] + list(zip(freq[:8], p[:8])):
        assert abs(f - q) < 4.5 * (q * (1 - q) / n) ** 0.5 + 1e-4, (float(f), float(q))
    assert sampling.gumbel_max(logits.repeat(50, 1), gens(50)).tolist() == ids[:50].tolist()


@pytest.mark.quick
def test_top_k_one_is_greedy(tmp_path, tok):
    _, m = tiny("qwen2-gqa-untied", tmp_path)
    g = generate(m, tok, PROMPTS, max_new_tokens=10, temperature=0)
    k = generate(m, tok, PROMPTS, max_new_tokens=10, temperature=0.7, top_k=1, seed=0)
    assert [o.tokens for o in g] == [o.tokens for o in k]


class CodeBias(torch.nn.Module):
    """Wraps a real model: while the response (after MARK) is a prefix of `script`, the next script token
    gets +20 on its logit, so a random model writes a code block; afterwards it samples freely.
    The same bias is applied in the teacher-forced forward, so log-probs must match exactly."""

    def __init__(self, model, script, mark):
        super().__init__()
        self.m, self.script, self.mark = model, script, mark
        self.config, self.hist = model.config, {}

    dtype = property(lambda self: self.m.dtype)
    device = property(lambda self: self.m.device)

    def bias(self, prefix):
        resp = prefix[len(prefix) - prefix[::-1].index(self.mark):] if self.mark in prefix else None
        b = torch.zeros(self.config.vocab_size)
        if resp is not None and len(resp) < len(self.script) and resp == self.script[:len(resp)]:
            b[self.script[len(resp)]] = 20.0
        return b

    def forward_cached(self, ids, cache, rows, n_new=None, all_logits=False):
        start = cache.seqlens[rows].tolist()
        n = n_new.tolist() if n_new is not None else [ids.shape[1]] * ids.shape[0]
        logits = self.m.forward_cached(ids, cache, rows, n_new)
        out = []
        for b, r in enumerate(rows.tolist()):
            h = self.hist.get(r, [])[:start[b]] + ids[b, :n[b]].tolist()
            self.hist[r] = h
            out.append(logits[b] + self.bias(h))
        return torch.stack(out)

    def full_logits(self, seq):
        with torch.no_grad():
            logits = self.m(torch.tensor([seq]))[0]
        return torch.stack([logits[t] + self.bias(seq[:t + 1]) for t in range(len(seq))])


@pytest.mark.quick
def test_logprobs_equal_teacher_forced_forward_with_tool_output_spliced(tmp_path, tok):
    _, m = tiny("qwen2-gqa-untied", tmp_path, vocab_size=len(tok))
    script = tok.encode("```python\nprint(6*7)\n```", add_special_tokens=False)
    mark = tok.encode(" Assistant", add_special_tokens=False)[-1]
    model = CodeBias(m, script, mark)
    prompts = [tok.encode("Hi there Assistant", add_special_tokens=False),
               tok.encode("Solve it. Assistant", add_special_tokens=False)]
    calls = []

    def tool(code):
        calls.append(code)
        return ToolOutput("42", False)

    temperature = 0.8
    outs = generate(model, tok, prompts, max_new_tokens=40, temperature=temperature, seed=3, tool=tool,
                    max_tool_calls=1)
    assert calls == ["print(6*7)\n", "print(6*7)\n"]
    for p, o in zip(prompts, outs):
        assert o.num_tool_calls == 1 and 0 in o.policy_mask and o.policy_mask[0] == 1
        assert "```output\n42\n```" in o.text
        seq = p + o.tokens
        logp = torch.log_softmax(model.full_logits(seq) / temperature, -1)
        for i, (t, lp, mk) in enumerate(zip(o.tokens, o.logprobs, o.policy_mask)):
            if mk:
                assert abs(lp - float(logp[len(p) + i - 1, t])) <= 1e-4, i
            else:
                assert lp == 0.0
        # sampled tokens after the output block exist, so the spliced cache was really used
        last_tool = max(i for i, mk in enumerate(o.policy_mask) if mk == 0)
        assert last_tool < len(o.tokens) - 1


@pytest.mark.quick
def test_spliced_cache_equals_reprefilling_the_whole_prefix(tmp_path, tok):
    """Keeping the KV cache across a tool call (only the output block is prefilled) and re-prefilling the
    whole prefix after it must sample the same tokens with the same log-probs, on a real model whose
    next tokens depend on every token before them, tool output included."""
    _, m = tiny("llama-gqa-tied", tmp_path, vocab_size=len(tok))
    script = tok.encode("```python\nprint(6*7)\n```", add_special_tokens=False)
    mark = tok.encode(" Assistant", add_special_tokens=False)[-1]
    prompts = [tok.encode("Hi there Assistant", add_special_tokens=False),
               tok.encode("Solve it. Assistant", add_special_tokens=False)]
    tool = lambda code: ToolOutput("42\nand more output text", False)
    kw = dict(max_new_tokens=40, temperature=0.8, seed=3, tool=tool, max_tool_calls=1, ignore_eos=True)
    keep = generate(CodeBias(m, script, mark), tok, prompts, **kw)
    again = generate(CodeBias(m, script, mark), tok, prompts, reprefill_after_tool=True, **kw)
    for a, b in zip(keep, again):
        assert a.num_tool_calls == 1 and a.policy_mask.index(0) < len(a.tokens) - 10   # decoding went on after it
        assert a.tokens == b.tokens and a.policy_mask == b.policy_mask
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-5


@pytest.mark.quick
def test_pending_is_what_the_row_has_not_cached_at_every_tick(tmp_path, tok, monkeypatch):
    """The engine's one invariant, checked after every tick: prompt + tokens == the row's cached tokens +
    pending, and the cache's length of the row is what the sequence counts; through prompt copies (a group
    shares its prompt, copied once the donor's chunked prefill has cached it), tool calls, both splice modes and
    rows freed and reused (max_batch below the prompts)."""
    import minitir.generate as G
    _, m = tiny("llama-gqa-tied", tmp_path, vocab_size=len(tok))
    script = tok.encode("```python\nprint(6*7)\n```", add_special_tokens=False)
    mark = tok.encode(" Assistant", add_special_tokens=False)[-1]
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("Hi there Assistant", "Solve it. Assistant")] * 3
    ticks, states, step, copy = [0], set(), G.Generation.step, G.Generation._copy_prompts

    def copying(run, seqs):   # mid-tick: a COPY row's donor is active and has its prompt cached
        for s in seqs:
            states.add(s.status)
            assert s.status is Status.COPY and s.donor in run.active and s.donor.cached >= len(s.prompt) - 1
            assert s.cached == 0 and s.pending == s.prompt
        copy(run, seqs)
        for s in seqs:
            assert len(s.prompt) + len(s.tokens) == s.cached + len(s.pending) == len(s.prompt)

    def checked(run):
        step(run)
        ticks[0] += 1
        for s in run.active:
            states.add(s.status)
            assert len(s.prompt) + len(s.tokens) == s.cached + len(s.pending), (s.status, ticks)
            assert int(run.cache.seqlens[s.row]) == s.cached and (s.status is Status.COPY) == (s.donor is not None)
    monkeypatch.setattr(G.Generation, "step", checked)
    monkeypatch.setattr(G.Generation, "_copy_prompts", copying)
    Status = G.Status
    for reprefill in (False, True):
        outs = generate(CodeBias(m, script, mark), tok, prompts, max_new_tokens=30, temperature=0.8, seed=1,
                        tool=lambda code: ToolOutput("42"), max_tool_calls=1, max_batch=4, ignore_eos=True, prefill_tokens=2,
                        reprefill_after_tool=reprefill)
        assert all(o.num_tool_calls == 1 for o in outs)
    assert {Status.COPY, Status.DECODE, Status.IN_TOOL} <= states and ticks[0] > 60


@pytest.mark.quick
def test_tool_output_over_the_limit_is_replaced_or_cut(tok):
    from minitir.tool_protocol import OUTPUT_TAIL, TOO_LONG
    code = "```python\nprint('x' * 500)\n```"
    scripts = {1: enc(tok, f"Go.\n{code}\nDone.")}
    kw = dict(max_new_tokens=400, temperature=0, tool=lambda c: ToolOutput("line\n" * 200), max_tool_calls=1,
              max_tool_output_tokens=40)
    a = generate(ScriptedModel(scripts, tok.eos_token_id), tok, [[1]], **kw)[0]
    block = tok.decode([t for t, mk in zip(a.tokens, a.policy_mask) if mk == 0])
    assert block == "\n```output\n" + TOO_LONG + OUTPUT_TAIL           # the paper's message and layout
    b = generate(ScriptedModel(scripts, tok.eos_token_id), tok, [[1]], tool_output_overflow="truncate", **kw)[0]
    tools = [t for t, mk in zip(b.tokens, b.policy_mask) if mk == 0]
    block = tok.decode(tools)
    assert block.startswith("\n```output\nline\n") and block.endswith("... (output truncated)" + OUTPUT_TAIL)
    assert len(tools) <= 40
    short = generate(ScriptedModel(scripts, tok.eos_token_id), tok, [[1]], **{**kw, "tool": lambda c: ToolOutput("7")})[0]
    assert tok.decode([t for t, mk in zip(short.tokens, short.policy_mask) if mk == 0]) == "\n```output\n7" + OUTPUT_TAIL
    assert short.policy_text == "Go.\n" + code + "\nDone." + tok.eos_token


class ScriptedModel:
    """A stand-in model: row r emits the token list scripts[first prompt token][k] on its k-th call,
    then EOS. Prompts repeat one script id. Tool tokens do not advance the script (the model 'ignores' them)."""

    def __init__(self, scripts, eos):
        self.scripts, self.k, self.script_of = scripts, {}, {}
        self.config = SimpleNamespace(num_hidden_layers=1, num_key_value_heads=1, head_dim=1, eos_token_id=eos,
                                      vocab_size=49152)
        self.dtype, self.device, self.steps, self.calls = torch.float32, torch.device("cpu"), 0, []

    def forward_cached(self, ids, cache, rows, n_new=None, all_logits=False):
        n = n_new.tolist() if n_new is not None else [ids.shape[1]] * ids.shape[0]
        self.calls.append((tuple(rows.tolist()), max(n)))
        out = torch.zeros(ids.shape[0], self.config.vocab_size)
        for b, r in enumerate(rows.tolist()):
            if int(cache.seqlens[r]) == 0 and (ids[b, :n[b]] == ids[b, 0]).all():  # a new prompt (not a re-prefill)
                self.script_of[r], self.k[r] = int(ids[b, 0]), 0
            script = self.scripts[self.script_of[r]]
            nxt = script[self.k[r]] if self.k[r] < len(script) else self.config.eos_token_id
            self.k[r] += 1
            out[b, nxt] = 30.0
        cache.seqlens[rows] += torch.tensor(n, dtype=torch.int32)
        self.steps += 1
        return out


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.quick
def test_tool_protocol_interrupt_resume_truncate_and_limit(tok):
    code = "```python\nprint('x' * 500)\n```"
    scripts = {1: enc(tok, f"Let me compute.\n{code}\nThen again {code}\nAnd a third {code}\nDone."),
               3: enc(tok, "No code here.")}
    model = ScriptedModel(scripts, tok.eos_token_id)
    seen = []

    def tool(c):
        seen.append(c)
        return ToolOutput("line\n" * 200 if len(seen) == 1 else "Traceback: boom", error=len(seen) == 2)

    outs = generate(model, tok, [[1, 1, 1], [3, 3]], max_new_tokens=400, temperature=0, tool=tool,
                    max_tool_calls=2, max_tool_output_tokens=22, tool_output_overflow="truncate")
    a, b = outs
    assert seen == ["print('x' * 500)\n"] * 2            # the third block is left unexecuted
    assert a.num_tool_calls == 2 and a.num_tool_errors == 1 and a.finish_reason == "stop"
    assert a.text.count("```output\n") == 2 and "(output truncated)" in a.text and "Traceback: boom" in a.text
    assert a.text.endswith("Done.<|im_end|>")
    assert b.num_tool_calls == 0 and b.text == "No code here.<|im_end|>"
    # the policy's own tokens are exactly its script, tool tokens are masked out
    policy = [t for t, mk in zip(a.tokens, a.policy_mask) if mk]
    assert policy == scripts[1] + [tok.eos_token_id]
    assert sum(1 - mk for mk in a.policy_mask) <= 2 * 22


def _schedule(tok, tool, lag=4):
    """Generate 4 rows, 3 with code blocks, through a ScriptedModel: -> (completions, the rows of every forward
    call, in order)."""
    code = "```python\nprint(1)\n```\n"
    scripts = {1: enc(tok, "a" + code + "b" * 3), 2: enc(tok, " word" * 12), 3: enc(tok, code + "c" + code + "d"),
               4: enc(tok, "e e" + code)}
    model = ScriptedModel(scripts, tok.eos_token_id)
    outs = generate(model, tok, [[1], [2], [3], [4]], max_new_tokens=60, temperature=0, tool=tool, max_tool_calls=2,
                    tool_lag=lag)
    return outs, model.calls


@pytest.mark.quick
def test_tool_results_rejoin_at_a_fixed_tick_however_long_the_code_runs(tok):
    """The schedule (which rows each forward pass holds) is a function of the tokens alone: an instant tool,
    one that sleeps a random time, and one slower than the whole generation give the same forward passes."""
    rng = random.Random(0)
    fast, fast_calls = _schedule(tok, lambda c: ToolOutput("1"))
    for sleep in (lambda: rng.uniform(0, 0.03), lambda: 0.2):
        outs, calls = _schedule(tok, lambda c: (time.sleep(sleep()), ToolOutput("1"))[1])
        assert calls == fast_calls
        assert [o.tokens for o in outs] == [o.tokens for o in fast]


@pytest.mark.quick
def test_other_rows_decode_tool_lag_tokens_while_code_runs_then_the_engine_waits(tok):
    """Row 0's block closes at some forward pass; the next tool_lag passes decode row 1 alone (while the slow
    code runs), and the pass after them prefills row 0's output block: the engine waited for it there."""
    scripts = {1: enc(tok, "a```python\nprint(1)\n```\nb"), 2: enc(tok, " word" * 30)}
    for lag in (1, 4):
        model = ScriptedModel(scripts, tok.eos_token_id)
        generate(model, tok, [[1], [2]], max_new_tokens=60, temperature=0, max_tool_calls=1, tool_lag=lag,
                 tool=lambda c: (time.sleep(0.05), ToolOutput("1"))[1])
        rows = [r for r, _ in model.calls]
        closed = rows.index((1,)) - 1          # the last pass holding row 0 before its code runs
        assert rows[closed] == (0, 1)
        assert rows[closed + 1:closed + 1 + lag] == [(1,)] * lag
        assert rows[closed + 1 + lag] == (0,) and model.calls[closed + 1 + lag][1] > 1


@pytest.mark.quick
def test_failing_tool_is_reported_not_raised(tok):
    model = ScriptedModel({1: enc(tok, "```python\n1/0\n```\nafter")}, tok.eos_token_id)

    def tool(code):
        raise RuntimeError("sandbox down")

    out = generate(model, tok, [[1]], max_new_tokens=100, temperature=0, tool=tool, max_tool_calls=1)[0]
    assert out.num_tool_errors == 1 and "tool failed: RuntimeError: sandbox down" in out.text
    assert out.num_tool_failures == 1   # the tool's failure, counted apart from the code's errors


@pytest.mark.quick
def test_sandbox_failure_is_counted_apart_from_code_errors(tok):
    model = ScriptedModel({1: enc(tok, "```python\n1/0\n```\nafter"), 2: enc(tok, "```python\n1/0\n```\nafter")},
                          tok.eos_token_id)
    results = {0: ExecResult("error", stderr="ZeroDivisionError: division by zero"),
               1: ExecResult("sandbox_error", stderr="sandbox worker died"), 2: ExecResult("timeout")}
    calls = []

    def tool(code):
        calls.append(code)
        return results[len(calls) - 1]

    outs = generate(model, tok, [[1], [2], [1]], max_new_tokens=100, temperature=0, tool=tool, max_tool_calls=1,
                    max_batch=1)
    assert [o.num_tool_errors for o in outs] == [1, 1, 1] and [o.num_tool_failures for o in outs] == [0, 1, 0]
    assert [o.num_tool_timeouts for o in outs] == [0, 0, 1]   # a wall-clock limit: counted, as a rerun may differ
    from minitir.rollout import rollout_metrics, sample_row
    from minitir.sample import Sample
    rows = [sample_row(Sample(prompt_ids=[1], completion=o, gold="")) for o in outs]
    assert rollout_metrics(rows)["tool_timeouts"] == 1


@pytest.mark.quick
def test_reprefill_baseline_gives_same_tokens(tok):
    scripts = {1: enc(tok, "```python\nprint(1)\n```\nresult follows")}
    kw = dict(max_new_tokens=100, temperature=0, tool=lambda c: ToolOutput("1"), max_tool_calls=1)
    a = generate(ScriptedModel(scripts, tok.eos_token_id), tok, [[1]], **kw)[0]
    b = generate(ScriptedModel(scripts, tok.eos_token_id), tok, [[1]], reprefill_after_tool=True, **kw)[0]
    assert a.tokens == b.tokens and a.policy_mask == b.policy_mask


@pytest.mark.quick
def test_stop_string_split_across_tokens_keeps_sampled_tokens(tok):
    text = "so <answer>\\boxed{4}</answer> trailing"
    script = enc(tok, text)
    model = ScriptedModel({1: script}, tok.eos_token_id)
    out = generate(model, tok, [[1]], max_new_tokens=100, temperature=0, stop=["</answer>"])[0]
    assert out.finish_reason == "stop" and "</answer>" in out.text
    assert "trailing" not in out.text
    assert out.tokens == script[:len(out.tokens)]
    # a stop string ending inside a token: the whole token is kept, as sampled
    cut = "</ans"
    out2 = generate(ScriptedModel({1: script}, tok.eos_token_id), tok, [[1]], max_new_tokens=100,
                    temperature=0, stop=[cut])[0]
    assert out2.finish_reason == "stop" and cut in out2.text
    assert out2.tokens == script[:len(out2.tokens)] and cut not in tok.decode(out2.tokens[:-1])


@pytest.mark.quick
def test_a_stop_string_in_tool_output_does_not_end_the_response(tok):
    """The paper's stop strings end what the model writes, not what its code prints: output holding
    "User:" and "</answer>" is spliced in and the model goes on to its own answer."""
    script = enc(tok, "```python\nprint(1)\n```\nso the answer is 4 <answer>\\boxed{4}</answer> extra")
    out = generate(ScriptedModel({1: script}, tok.eos_token_id), tok, [[1]], max_new_tokens=100, temperature=0,
                   stop=["User:", "</answer>"], tool=lambda c: ToolOutput("User: hi </answer>"), max_tool_calls=1)[0]
    assert out.num_tool_calls == 1 and out.finish_reason == "stop"
    assert "User: hi </answer>" in out.text and out.text.rstrip().endswith("\\boxed{4}</answer>")


@pytest.mark.quick
def test_length_limits_and_long_prompts(tok):
    model = ScriptedModel({1: enc(tok, " a" * 50), 2: enc(tok, "```python\nx\n```\nmore")}, tok.eos_token_id)
    outs = generate(model, tok, [[1] * 3, [1] * 30, [2]], max_new_tokens=8, temperature=0, max_len=20,
                    tool=lambda c: ToolOutput("y" * 100), max_tool_calls=1)
    assert outs[0].finish_reason == "length" and len(outs[0].tokens) == 8
    assert outs[1].finish_reason == "prompt_too_long" and outs[1].tokens == []
    assert outs[2].finish_reason == "length" and len(outs[2].tokens) <= 8


@pytest.mark.quick
def test_decode_graph_buffers_pad_batches_into_a_scratch_row(tmp_path, tok, monkeypatch):
    """DecodeGraphs off CUDA runs its static buffers and bucket padding eagerly: everything the CUDA graphs
    do except the capture. 7 prompts on 5 rows (buckets 1, 2, 4, 5) with ragged lengths: batches of 3 are
    padded to 4 with the scratch row, which must neither disturb the real rows nor keep a length."""
    import minitir.generate as G
    _, m = tiny("llama-gqa-tied", tmp_path)
    prompts = PROMPTS + [[7, 7, 7], [90, 1, 2, 3, 4], [3] * 9]
    kw = dict(max_new_tokens=15, temperature=0.8, seed=1, max_batch=5, prefill_tokens=8, ignore_eos=True)
    plain = generate(m, tok, prompts, **kw)
    monkeypatch.setattr(G, "_graphs_supported", lambda model, device, dtype: True)
    steps, call = [], G.DecodeGraphs.__call__

    def spy(self, ids, rows):
        out = call(self, ids, rows)
        steps.append((ids.shape[0], self.cache.k.shape[1], int(self.cache.seqlens[self.scratch]), self.sizes))
        return out

    monkeypatch.setattr(G.DecodeGraphs, "__call__", spy)
    graphed = generate(m, tok, prompts, **kw)
    assert {s[1] for s in steps} == {6} and steps[0][3] == [1, 2, 4, 5]   # 5 rows + the scratch row
    assert all(s[2] == 0 for s in steps)
    assert any(s[0] == 3 for s in steps)                                    # a batch that was padded
    for a, b in zip(plain, graphed):
        assert a.tokens == b.tokens
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-5


@pytest.mark.quick
def test_decode_graph_step_touches_only_its_rows(tmp_path):
    """One padded step (3 rows -> the graph of 4): logits equal the plain cached forward, and the cache
    changes only at the 3 rows' new positions; other rows, cached or free, are untouched."""
    import minitir.generate as G
    from minitir.model import KVCache
    _, m = tiny("qwen2-gqa-untied", tmp_path)
    cache = KVCache(m.config, 6 + 1, 16)                     # 6 rows + scratch
    g = torch.Generator().manual_seed(0)
    m.forward_cached(torch.randint(0, 97, (6, 5), generator=g), cache, torch.arange(6),
                     torch.tensor([5, 3, 4, 5, 2, 1]))
    graphs = G.DecodeGraphs(m, cache, 6)
    assert graphs.sizes == [1, 2, 4, 6]
    ref = KVCache(m.config, 7, 16)
    ref.k.copy_(cache.k), ref.v.copy_(cache.v), ref.seqlens.copy_(cache.seqlens)
    ids, rows = torch.tensor([[4], [9], [30]]), torch.tensor([4, 0, 2], dtype=torch.int32)
    before = cache.seqlens.clone()
    out = graphs(ids, rows)
    want = m.forward_cached(ids, ref, rows)
    assert out.shape == want.shape and (out - want).abs().max() <= 1e-5
    assert cache.seqlens.tolist() == ref.seqlens.tolist() and int(cache.seqlens[6]) == 0
    for r in range(6):   # ref got exactly the 3 rows' writes
        n = int(before[r]) + (r in (0, 2, 4))
        assert torch.equal(cache.k[:, r, :n], ref.k[:, r, :n]) and torch.equal(cache.v[:, r, :n], ref.v[:, r, :n])


def test_one_engine_keeps_its_cache_and_graphs_across_calls_and_replays_updated_weights(tmp_path, tok, monkeypatch):
    """What a training run does with its engine: calls under different configurations (rollouts, a greedy
    evaluation, a smaller refill round) reuse one cache and one capture; weights updated in place between
    calls are the weights the kept graphs decode with; a call needing more rows captures again; release()
    frees them. Off CUDA the graphs run their buffers eagerly, so the reuse is checked, not the capture."""
    import minitir.generate as G
    _, m = tiny("llama-gqa-tied", tmp_path)
    monkeypatch.setattr(G, "_graphs_supported", lambda model, device, dtype: True)
    prompts = PROMPTS + [[7, 7, 7], [90, 1, 2, 3, 4]]
    calls = [dict(max_new_tokens=12, temperature=0.8, seed=1, max_batch=4),
             dict(max_new_tokens=6, temperature=0.0, max_batch=4),
             dict(max_new_tokens=12, temperature=1.0, seed=2, max_batch=2)]
    engine = G.Engine(m, tok)
    for i, kw in enumerate(calls):
        if i == 2:
            with torch.no_grad():   # an optimizer step between calls: in place, as Learner.decoder refreshes
                for p in m.parameters():
                    p.mul_(1.05)
        fresh = G.Engine(m, tok).generate(prompts, G.GenerationConfig(**kw))
        kept = engine.generate(prompts, G.GenerationConfig(**kw))
        assert [o.tokens for o in kept] == [o.tokens for o in fresh]
        assert max(abs(a - b) for x, y in zip(kept, fresh) for a, b in zip(x.logprobs, y.logprobs)) <= 1e-5
    assert engine.captures == 1 and engine.graphs is not None
    replays, call = [], G.DecodeGraphs.__call__
    monkeypatch.setattr(G.DecodeGraphs, "__call__", lambda self, *a: replays.append(1) or call(self, *a))
    engine.generate(prompts, G.GenerationConfig(max_new_tokens=4, max_batch=4, cuda_graphs=False))
    assert not replays and engine.captures == 1                  # graphs kept, not used when a call says no
    longest = max(map(len, prompts))
    longer = G.GenerationConfig(max_new_tokens=60, temperature=0.8, seed=3, max_batch=2)   # past the cache's length
    out = engine.generate(prompts, longer)
    grown = attention.cache_length(longest + 60, torch.empty(0))                              # whole key blocks
    assert engine.captures == 2 and engine.cache.max_len == grown == 128 and engine.capacity == 4   # grown, rows kept
    assert [o.tokens for o in out] == [o.tokens for o in G.Engine(m, tok).generate(prompts, longer)]
    engine.generate(prompts, G.GenerationConfig(max_new_tokens=4, max_batch=6))   # more rows than the cache has
    assert engine.captures == 3 and engine.capacity == 6 and engine.cache.max_len == grown
    engine.release()
    assert engine.cache is None and engine.graphs is None


@pytest.mark.quick
def test_a_failed_capture_of_any_kind_falls_back_once_with_a_warning(tmp_path, tok, monkeypatch):
    import minitir.generate as G
    _, m = tiny("llama-gqa-tied", tmp_path)
    want = generate(m, tok, PROMPTS, max_new_tokens=8, temperature=0)
    monkeypatch.setattr(G, "_graphs_supported", lambda model, device, dtype: True)

    def broken(self, *a, **kw):
        raise ValueError("no capture here")

    monkeypatch.setattr(G.DecodeGraphs, "__init__", broken)
    engine = G.Engine(m, tok)
    cfg = G.GenerationConfig(max_new_tokens=8, temperature=0)
    with pytest.warns(UserWarning, match="ValueError: no capture here"):
        first = engine.generate(PROMPTS, cfg)
    second = engine.generate(PROMPTS, G.GenerationConfig(max_new_tokens=8, temperature=0, max_batch=64))
    assert engine.captures == 1 and engine.graphs_failed      # not tried again
    assert [o.tokens for o in first] == [o.tokens for o in second] == [o.tokens for o in want]


@pytest.mark.quick
def test_stop_strings_are_checked_on_the_new_tail_and_progress_is_reported(tmp_path, tok):
    """Each step decodes a bounded tail of a row (the stop string's length in tokens), not the whole text
    generated so far; progress callbacks count every sequence once."""
    import minitir.generate as G
    _, m = tiny("llama-gqa-tied", tmp_path)
    seen, decode = [], tok.decode

    class Counting:
        eos_token_id = tok.eos_token_id

        def decode(self, ids, **kw):
            seen.append(len(ids))
            return decode(ids, **kw)

    done = []
    cfg = G.GenerationConfig(max_new_tokens=40, temperature=1.0, seed=0, stop=("zzz",), ignore_eos=True)
    outs = G.Engine(m, Counting()).generate(PROMPTS + [[]], cfg, progress=done.append)   # [] ends at once
    assert sum(done) == len(PROMPTS) + 1 and all(len(o.tokens) == 40 for o in outs[:-1])
    window = 4 * len("zzz") + 4
    per_step = seen[:-2 * (len(PROMPTS) + 1)]   # the last decodes are each completion's text and policy text
    assert len(per_step) >= 39 * len(PROMPTS) and max(per_step) <= window


CUDA_GRAPHS = torch.cuda.is_available() and (attention._flash_kvcache is not None or attention.TORCH_VARLEN_PAGED)


@pytest.mark.quick
@pytest.mark.skipif(not CUDA_GRAPHS, reason="needs CUDA and a FlashAttention kernel (flash-attn or torch's varlen_attn)")
def test_cuda_graph_decode_on_gpu(tmp_path, monkeypatch):
    """The capture itself, on a GPU: every bucket is captured (no fallback warning); a replayed padded step
    equals the same step run eagerly (logits, cache writes, lengths, the scratch row's reset); and generate
    with graphs returns log-probs equal to a teacher-forced forward over each final sequence (bfloat16)."""
    import warnings
    import minitir.generate as G
    from minitir.model import KVCache
    _, m = tiny("qwen2-gqa-untied", tmp_path)
    m = m.to("cuda", torch.bfloat16)
    tok = SimpleNamespace(eos_token_id=None, decode=lambda ids: "")   # no tokenizer download on a GPU machine
    ids0 = torch.randint(0, 97, (6, 5), generator=torch.Generator().manual_seed(0)).cuda()
    caches = []
    L = attention.cache_length(16, ids0.to(torch.bfloat16))   # whole pages for torch's paged kernel
    for _ in range(2):
        c = KVCache(m.config, 6 + 1, L, dtype=torch.bfloat16, device="cuda")   # 6 rows + scratch
        m.forward_cached(ids0, c, torch.arange(6), torch.tensor([5, 3, 4, 5, 2, 1]))
        caches.append(c)
    before = caches[0].k.clone()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="CUDA-graph capture")
        graphs = G.DecodeGraphs(m, caches[0], 6)
        eager = G.DecodeGraphs(m, caches[1], 6)
    assert sorted(graphs.graphs) == graphs.sizes == [1, 2, 4, 6]
    eager.graphs.clear()                                     # its calls run the same step without a graph
    ids = torch.tensor([[4], [9], [30]], device="cuda")
    rows = torch.tensor([4, 0, 2], dtype=torch.int32, device="cuda")
    out, want = graphs(ids, rows).float(), eager(ids, rows).float()
    assert (out - want).abs().max() <= 1e-2
    assert caches[0].seqlens.tolist() == caches[1].seqlens.tolist() == [6, 3, 5, 5, 3, 1, 0]
    assert (caches[0].k[:, :6].float() - caches[1].k[:, :6].float()).abs().max() <= 1e-2
    assert torch.equal(caches[0].k[:, [1, 3, 5]], before[:, [1, 3, 5]])  # rows outside the batch untouched

    replays = []
    call = G.DecodeGraphs.__call__

    def spy(self, ids, rows):
        replays.append((ids.shape[0], len(self.graphs)))
        return call(self, ids, rows)

    monkeypatch.setattr(G.DecodeGraphs, "__call__", spy)
    prompts = PROMPTS + [[7, 7, 7], [90, 1, 2, 3, 4], [3] * 9]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="CUDA-graph capture")
        outs = generate(m, tok, prompts, max_new_tokens=15, temperature=0.8, seed=1, max_batch=5,
                        prefill_tokens=8, ignore_eos=True)
    assert replays and all(n > 0 for _, n in replays) and any(b == 3 for b, _ in replays)
    for p, o in zip(prompts, outs):
        seq = p + o.tokens
        with torch.no_grad():
            logp = torch.log_softmax(m(torch.tensor([seq], device="cuda"))[0].float() / 0.8, -1)
        for i, (t, lp) in enumerate(zip(o.tokens, o.logprobs)):
            assert abs(lp - float(logp[len(p) + i - 1, t])) <= 0.1, (p, i)


@pytest.mark.quick
@pytest.mark.skipif(not __import__("minitir.ops", fromlist=["_BF16"])._BF16, reason="no native bfloat16 products")
def test_a_model_converted_between_generations_decodes_with_its_new_weights(tmp_path, tok):
    """model.to(dtype) keeps the parameters' identity but gives them new data: the packed weights kept on the
    modules follow (a stale float32 packing served to a bfloat16 model failed in oneDNN), both ways."""
    import copy
    _, m = tiny("llama-gqa-tied", tmp_path)
    kw = dict(max_new_tokens=8, temperature=1.0, seed=4)
    for dtype in (torch.bfloat16, torch.float32, torch.bfloat16):
        generate(m, tok, PROMPTS, **kw)                     # packs the weights as they are now
        m.to(dtype)
        got = generate(m, tok, PROMPTS, **kw)
        want = generate(copy.deepcopy(m), tok, PROMPTS, **kw)   # a fresh copy: no packing kept
        assert [o.tokens for o in got] == [o.tokens for o in want]
        assert [o.logprobs for o in got] == [o.logprobs for o in want]


@pytest.mark.quick
def test_tool_time_is_the_runs_own_time():
    """time/tools_s adds up the runs' own time as the sandbox reports it (not the calls' wall time, which holds
    the wait for a free worker), from many threads at once; a plain callable is a tool too."""
    from minitir.rollout import TimedTool
    queued = TimedTool(lambda code: (time.sleep(0.02), ExecResult("ok", "1\n", duration_s=0.01))[1])
    with ThreadPoolExecutor(8) as pool:
        assert all(r.text == "1" for r in pool.map(queued.run, ["print(1)"] * 64))
    assert queued.seconds == pytest.approx(0.64)
    plain = TimedTool(lambda code: "2")
    assert plain.run("print(2)") == "2" and 0 < plain.seconds < 1


class QueuedTool:
    """A sandbox as the engine sees one: submit(code) -> Future, served by its own workers (here one thread),
    and a run() that must not be used (the protocol takes the sandbox's futures as they are)."""

    def __init__(self, hold=False):
        self.workers, self.hold, self.submitted = ThreadPoolExecutor(1), hold, []

    def submit(self, code):
        self.submitted.append(code)
        if self.hold:   # queued behind a run that never ends: still pending at close
            return Future()
        return self.workers.submit(lambda: ExecResult("ok", "7\n", duration_s=0.25))

    def run(self, code):
        raise AssertionError("the tool protocol ran the sandbox on threads of its own")


@pytest.mark.quick
def test_a_sandbox_is_used_through_its_own_futures(tok):
    """No thread pool on top of the sandbox's queue: its submit's futures are taken back as they are, the
    runs' own time is counted from them, and a run still queued when a generation ends is cancelled."""
    from minitir.rollout import TimedTool
    from minitir.tool_protocol import ToolProtocol
    scripts = {1: enc(tok, "```python\nprint(7)\n```\nso")}
    sandbox = QueuedTool()
    timed = TimedTool(sandbox)
    out = generate(ScriptedModel(scripts, tok.eos_token_id), tok, [[1], [1]], max_new_tokens=60, temperature=0,
                   tool=timed, max_tool_calls=1)
    assert all("```output\n7\n```" in tok.decode(o.tokens) for o in out) and len(sandbox.submitted) == 2
    assert timed.seconds == pytest.approx(0.5)
    held = ToolProtocol(tok, QueuedTool(hold=True), GenerationConfig(max_new_tokens=8))
    assert held.pool is None
    future = held.submit("print(1)")
    held.close()
    assert future.cancelled()


@pytest.mark.quick
def test_a_sandbox_that_refuses_a_run_is_a_failed_tool_call_not_a_lost_batch(tok):
    class Closed(QueuedTool):
        def submit(self, code):
            raise RuntimeError("cannot schedule new futures after shutdown")
    scripts = {1: enc(tok, "```python\nprint(7)\n```\nso")}
    out = generate(ScriptedModel(scripts, tok.eos_token_id), tok, [[1]], max_new_tokens=60, temperature=0,
                   tool=Closed(), max_tool_calls=1)[0]
    assert out.num_tool_failures == 1 and "tool failed: RuntimeError" in tok.decode(out.tokens)
