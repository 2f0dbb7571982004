"""The paper's situation at a size a laptop trains in minutes: a base model of our own that *can* write and
run code but rarely does, which outcome RL then teaches to use it.

1. Problems where code pays (`tasks.miniature_problems`): products, modular powers, sums of primes, and
   two-step problems whose second program needs the number the first one prints (where a second tool call
   pays). One in ten is small enough to memorise; the rest are too large to answer without computing.
2. A corpus in the zero_tir format (`corpus`): each document is the paper's prompt and a response that
   mostly answers directly (the right answer: memorisable when small, a guess to the model when large)
   and sometimes writes the problem's ```python blocks with the numbers it has read, shows their ```output
   blocks and copies the result into `<answer>\\boxed{}</answer>`. The paper's prompt, stop strings and strict
   reward then apply unchanged. Some documents use the no-tool zero_rl prompt (direct answers only), so the
   same base model can be trained both ways. Most answers to products slip out of the paper's format (no
   answer tags): a habit only the strict reward teaches away, so strict and lenient rewards can differ.
3. A compact vocabulary over the embedded SmolLM2 tokenizer (`minitir.vocab`).
4. Pretraining (`pretrain`): minitir's own Transformer, Llama-shaped, about half a million parameters,
   next-token loss on the responses. The prompt's text before the question is the same in every document
   of a batch, so it is computed once per batch and every document attends to it.
5. The base model ships with minitir (minitir/miniature_base/, 2 MB of weights), so `python train.py` starts
   RL at once; it loads by the model name "miniature". `python -m minitir.miniature` rebuilds it (`build`),
   with a fingerprint of what it was trained from (`fingerprint`), which a test checks against today's code.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from minitir.checkpoint import MINIATURE_DIR, embedded_checkpoint, save_pretrained
from minitir.model import ModelConfig, Transformer
from minitir.tasks import MINIATURE_KINDS, TEMPLATES, Problem, PromptTemplate, miniature_problems, render_prompt
from minitir.tool_protocol import OUTPUT_TAIL
from minitir.vocab import CompactTokenizer

VERSION = 2   # bump when the pretraining changes: the shipped base model's fingerprint includes it


# --- the corpus: the paper's prompt, then a response in the strict format -----------------------
def answer_text(answer: str) -> str:
    return f"</think> <answer>\\boxed{{{answer}}}</answer>"


def slip_text(answer: str) -> str:
    """An ending outside the paper's format (no <answer> section): the strict reward scores it 0, the lenient
    one grades its \\boxed answer."""
    return f"</think> The answer is \\boxed{{{answer}}}."


def response_parts(p: Problem, code: bool, slip: bool) -> list[tuple[str, int]]:
    """A response as (text, 1 if the model writes it, 0 if the generator splices it in): each of the
    problem's programs in a ```python block and its ```output block, or a direct answer; then the answer,
    in the paper's format or slipped (which then ends at EOS: no stop string ends it)."""
    parts = []
    if code:
        for program, printed in p.meta["programs"]:
            parts += [(f" ```python\n{program}\n```", 1), ("\n```output\n" + printed + OUTPUT_TAIL, 0)]
    ending = slip_text(p.answer) if slip else answer_text(p.answer)
    return parts + [(ending if code else " " + ending, 1)]


@dataclass
class Document:
    prompt: str                 # the framing: "zero_tir", "zero_rl" or "bare"
    ids: list[int]              # prompt and response tokens
    loss: list[int]             # 1 where the token is the model's to predict (the response, tool output excluded)


# a question with no instructions around it, as text on the web comes: the framing that teaches the skills
BARE = PromptTemplate("{question}\nAssistant: <think>", TEMPLATES["zero_tir"].stop, tools=True)
FRAMINGS = {"zero_tir": TEMPLATES["zero_tir"], "zero_rl": TEMPLATES["zero_rl"], "bare": BARE}


def corpus(tok, n: int, seed: int, code_share: float, rl_share: float, bare_share: float,
           kinds: tuple[str, ...] = tuple(MINIATURE_KINDS), slip_kinds: tuple[str, ...] = (),
           slip_share: float = 0.0) -> list[Document]:
    """n documents: shares rl_share under the zero_rl prompt (direct answers), bare_share as the bare
    question, the rest under zero_tir; of the zero_tir and bare ones, code_share use code; of the responses
    to slip_kinds, slip_share end outside the paper's format (a habit the strict reward can teach away).
    Segments are tokenized apart, as the generator sees them."""
    r = random.Random(seed + 1)
    docs = []
    for p in miniature_problems(n, seed, kinds=kinds):
        u = r.random()
        name = "zero_rl" if u < rl_share else "bare" if u < rl_share + bare_share else "zero_tir"
        code = name != "zero_rl" and r.random() < code_share
        slip = p.meta["kind"] in slip_kinds and r.random() < slip_share
        ids = tok(render_prompt(FRAMINGS[name], p.question)).input_ids
        loss = [0] * len(ids)
        for text, m in response_parts(p, code, slip):
            toks = tok.encode(text)
            ids, loss = ids + toks, loss + [m] * len(toks)
        if slip:
            ids, loss = ids + [tok.eos_token_id], loss + [1]
        docs.append(Document(name, ids, loss))
    return docs


# --- pretraining --------------------------------------------------------------------------------
@dataclass
class BaseConfig:
    """Two stretches of pretraining on the same kind of corpus: the skill (many responses use code, mostly
    bare questions, so copying numbers into code and out of its output is learned fast), then the habit
    (few responses use code, mostly under the paper's prompts), which is what the base model ends with."""
    documents: int = 24_000       # for each stretch
    skill_steps: int = 800
    skill_code_share: float = 0.8
    skill_bare_share: float = 0.8
    habit_steps: int = 300
    code_share: float = 0.12      # of the zero_tir and bare documents: responses that use code
    rl_share: float = 0.2         # documents under the no-tool zero_rl prompt
    bare_share: float = 0.3       # documents with the bare question
    slip_kinds: tuple[str, ...] = ("product",)   # responses to these questions often end outside the format ...
    slip_share: float = 0.7       # ... this often (in both stretches): what the strict reward has to teach away
    hidden_size: int = 128
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 256
    batch: int = 64
    lr: float = 3e-3
    seed: int = 0
    kinds: tuple[str, ...] = tuple(MINIATURE_KINDS)


def forward_with_prefix(model, prefix: torch.Tensor, groups: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits [B, T, V] for each group of rows ids [B, T] (right-padded) continuing the same prefix [P]: the
    prefix runs once, as a batch of one, and every row attends to its keys and values, then causally to
    its own tokens. Rows of similar lengths go in one group, so little is spent on padding."""
    m, cfg = model.model, model.config
    P = prefix.shape[0]
    gqa = cfg.num_attention_heads != cfg.num_key_value_heads
    rope = [model._rope(P + torch.arange(g.shape[1])) for g in groups]
    masks = [torch.ones(g.shape[1], P + g.shape[1], dtype=torch.bool).tril(diagonal=P) for g in groups]  # [T, P+T]
    kv = {}

    def attend_prefix(q, k, v):                                                    # [1, P, H, hd]
        kv["k"], kv["v"] = k, v
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=gqa)
        return o.transpose(1, 2)

    def attend_rows(mask):
        def attend(q, k, v):                                                       # [B, T, H, hd]
            B = q.shape[0]
            keys = torch.cat([kv["k"].expand(B, -1, -1, -1), k], 1).transpose(1, 2)
            vals = torch.cat([kv["v"].expand(B, -1, -1, -1), v], 1).transpose(1, 2)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), keys, vals, attn_mask=mask, enable_gqa=gqa)
            return o.transpose(1, 2)
        return attend

    cos_p, sin_p = model._rope(torch.arange(P))
    xp, xs = m.embed_tokens(prefix)[None], [m.embed_tokens(g) for g in groups]    # [1, P, D], [B, T, D]
    hd = cfg.head_dim
    for layer in m.layers:
        if P:
            xp = layer(xp, cos_p, sin_p, attend_prefix)
        else:   # nothing shared: empty keys and values
            kv["k"] = kv["v"] = xp.new_zeros(1, 0, cfg.num_key_value_heads, hd)
        xs = [layer(x, cos, sin, attend_rows(mask)) for x, (cos, sin), mask in zip(xs, rope, masks)]
    return [model.lm_head(m.norm(x)) for x in xs]


def _batches(docs: list[Document], batch: int, steps: int, seed: int):
    """`steps` batches, each of documents under one prompt, as (prefix [P], groups of (ids [B, T],
    targets [B, T])): the batch's shorter and longer halves are padded apart."""
    by_prompt = {}
    for d in docs:
        by_prompt.setdefault(d.prompt, []).append(d)
    prefix_len = {name: len(os.path.commonprefix([d.ids for d in ds])) for name, ds in by_prompt.items()}
    names = sorted(by_prompt)
    weights = [len(by_prompt[n]) for n in names]
    r = random.Random(seed + 2)
    for _ in range(steps):
        name = r.choices(names, weights)[0]
        P = prefix_len[name]
        chosen = sorted(r.sample(by_prompt[name], batch), key=lambda d: len(d.ids))
        groups = []
        for part in (chosen[:batch // 2], chosen[batch // 2:]):
            T = len(part[-1].ids) - P
            ids = torch.zeros(len(part), T, dtype=torch.long)
            targets = torch.full((len(part), T), -100)
            for b, d in enumerate(part):
                rest = d.ids[P:]
                ids[b, :len(rest)] = torch.tensor(rest)
                want = [t if m else -100 for t, m in zip(d.ids[P + 1:], d.loss[P + 1:])]
                targets[b, :len(want)] = torch.tensor(want, dtype=torch.long)
            groups.append((ids, targets))
        yield torch.tensor(chosen[0].ids[:P], dtype=torch.long), groups


def compact_tokenizer(cfg: BaseConfig):
    """The compact vocabulary: the pieces of the corpus's prompts, code, outputs and answers, and of the
    digits and error messages tool output holds, over the embedded SmolLM2 tokenizer."""
    from transformers import AutoTokenizer
    base = AutoTokenizer.from_pretrained(embedded_checkpoint())
    probs = miniature_problems(3000, cfg.seed)
    texts = [render_prompt(TEMPLATES[n], p.question) for n in ("zero_tir", "zero_rl") for p in probs[:300]]
    texts += [t for p in probs for code in (True, False) for slip in (True, False)
              for t, _ in response_parts(p, code, slip)]
    extra = [str(d) for d in range(10)] + ["-", "\n", "Traceback (most recent call last):", "Error", "line"]
    return CompactTokenizer.build(base, texts, extra)


def stretches(cfg: BaseConfig, tok) -> list[tuple[list[Document], int]]:
    """(documents, steps) of the two stretches: the skill, then the habit."""
    slips = dict(slip_kinds=cfg.slip_kinds, slip_share=cfg.slip_share)
    return [(corpus(tok, cfg.documents, cfg.seed, cfg.skill_code_share, 0.0, cfg.skill_bare_share, cfg.kinds, **slips),
             cfg.skill_steps),
            (corpus(tok, cfg.documents, cfg.seed + 7, cfg.code_share, cfg.rl_share, cfg.bare_share, cfg.kinds, **slips),
             cfg.habit_steps)]


def pretrain(cfg: BaseConfig, log=print):
    """-> (model, compact tokenizer), trained from scratch on the corpus; deterministic for cfg.seed."""
    tok = compact_tokenizer(cfg)
    mc = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=cfg.hidden_size,
                     intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.layers,
                     num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                     head_dim=cfg.hidden_size // cfg.heads, max_position_embeddings=1024,
                     eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(cfg.seed)
    model = Transformer(mc).init_weights(std=0.02, seed=cfg.seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
    total = cfg.skill_steps + cfg.habit_steps
    warm = max(total // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(i, total) / total))))
    t0, step = time.time(), 0
    for docs, steps in stretches(cfg, tok):
        for prefix, groups in _batches(docs, cfg.batch, steps, cfg.seed + step):
            logits = forward_with_prefix(model, prefix, [ids for ids, _ in groups])
            loss = F.cross_entropy(torch.cat([lg.flatten(0, 1) for lg in logits]),
                                   torch.cat([t.flatten() for _, t in groups]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0 or step == total:
                log(f"pretraining the miniature base model: step {step}/{total}, loss {loss.item():.3f}, "
                    f"{time.time() - t0:.0f}s")
    return model.eval(), tok


# --- the shipped base model ---------------------------------------------------------------------
def fingerprint(cfg: BaseConfig) -> str:
    """What the base model was trained from: VERSION, the configuration, the compact vocabulary and the first
    documents of both stretches. The shipped model's base_config.json holds it, and a test recomputes it,
    so a change to the corpus or the configuration cannot leave the shipped weights silently stale (a change
    to the training loop itself bumps VERSION)."""
    tok = compact_tokenizer(cfg)
    head = [(d.prompt, d.ids, d.loss) for docs, _ in stretches(replace(cfg, documents=64), tok) for d in docs]
    blob = json.dumps({"version": VERSION, "config": asdict(cfg), "vocab": tok.base_ids, "corpus": head})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build(cfg: BaseConfig | None = None, out: Path = MINIATURE_DIR, log=lambda s: print(s, flush=True)) -> Path:
    """Pretrain the base model and write it to `out` (by default the directory shipped with minitir, which
    `load_pretrained("miniature")` reads), with base_config.json: the configuration and its fingerprint."""
    cfg = cfg or BaseConfig()
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))   # the same arithmetic, so the same model, everywhere
    try:
        model, tok = pretrain(cfg, log)
    finally:
        torch.set_num_threads(threads)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".miniature-"))
    save_pretrained(model, tok, tmp)
    (tmp / "base_config.json").write_text(json.dumps({"fingerprint": fingerprint(cfg), **asdict(cfg)}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":   # python -m minitir.miniature: rebuild the shipped base model (~6 minutes on 2 cores)
    t = time.time()
    print(f"written: {build()} in {time.time() - t:.0f} s")
