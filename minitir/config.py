"""TrainConfig: every setting of a run, documented where it is declared (`python train.py --help` shows the
comments), and `validate`, which reports a mistake before anything heavy runs. Choice fields are Literal
types: tyro checks them on the command line and `validate` reads the same lists for Python callers."""
from __future__ import annotations

import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import torch

from minitir.model import LINEARS

ROOT = Path(__file__).resolve().parents[1]
Algo = Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "ppo"]
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]


@dataclass
class TrainConfig:
    # --- model ---
    model: str = "miniature"            # local dir, hub id, short name (Qwen2.5-1.5B), smollm2-135m or miniature
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"   # bfloat16: float32 master weights, bfloat16 autocast
                                        # and a bfloat16 decode copy (the GPU recipe, on CPU too); float32: all
                                        # float32; auto: bfloat16 on CUDA and on CPUs with native bfloat16 products
    device: Literal["auto", "cpu", "cuda"] = "auto"           # auto: CUDA when there is a GPU
    checkpointing: Literal["none", "selective", "full"] = "selective"   # activation checkpointing in training
    batch_invariant: bool = True        # the trainer's packed forward attends with the decoder's block kernel (on
                                        # CUDA also fixed-shape products, no FlashAttention, no CUDA graphs): a token's
                                        # log-prob is the same bits in generator and trainer, whatever batch or thread
                                        # count computed it (docs/usage.md: same seed, same run)
    lora_rank: int = 0                  # LoRA adapters of this rank on --lora-targets, the rest frozen (0: full
                                        # fine-tuning); use a learning rate about 10x full fine-tuning's
    lora_alpha: float = 32.0            # the adapters' update is scaled by lora_alpha / lora_rank
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"   # every linear of the decoder
    # --- data ---
    data: str = "miniature"             # miniature | synthetic | a benchmark name (math_train, gsm8k, ...) | a file
    data_dir: str = str(ROOT / "data")  # where benchmark files are looked up (then the Hugging Face hub)
    question_field: str | None = None   # the question's field in a data file (default: problem/question/prompt)
    answer_field: str | None = None     # the gold answer's field (default: answer/final_answer/solution)
    synthetic_size: int = 2000          # problems generated for --data miniature or synthetic
    synthetic_difficulty: int = 1       # --data synthetic: 1 (small numbers) .. 5 (large)
    eval_data: str = ""                 # held-out benchmark; "" = the last eval_size problems of the training data
    eval_size: int = 32                 # held-out problems, evaluated greedily (0 = no evaluation)
    eval_every: int = 0                 # steps between evaluations, and one before training (0 = at the end only)
    prompt: str = "zero_tir"            # zero_tir | zero_rl | zero_tir_explained | chat_tir | a text with {question}
    max_prompt_tokens: int = 1024       # prompt budget: training problems with longer prompts are skipped (and counted)
    # --- rollout ---
    prompts_per_step: int = 8           # problems per step (before dynamic-sampling refills)
    n_samples: int = 8                  # responses per problem: the group of the group baselines
    max_new_tokens: int = 1024          # response budget, tool output included
    temperature: float = 1.0            # sampling temperature (the log-probs are taken at it too)
    top_p: float = 1.0                  # nucleus sampling
    max_tool_calls: int = 2             # code executions per response (the paper: 2)
    max_tool_output_tokens: int = 256   # a whole output block over this many tokens is replaced (or cut)
    tool_output_overflow: Literal["replace", "truncate"] = "replace"   # the paper's "too long" message, or cut
    max_batch: int = 64                 # sequences decoded at once (KV-cache rows)
    sandbox_url: str = ""               # a remote `sandbox.py serve` (or SandboxFusion) instead of local workers
    sandbox_timeout_s: float = 5.0      # seconds per code run
    sandbox_memory_mb: int = 1024       # memory per code run, all its processes (sent to a sandbox_url too)
    sandbox_workers: int = 2            # local fork servers (runs in parallel)
    sandbox_allow_unisolated: bool = False   # run model-written code even where neither namespaces nor Landlock
                                        # isolate it (by default the run stops before loading the model)
    # --- reward ---
    reward: Literal["strict", "lenient"] = "strict"   # strict: the paper's gates (format, ended normally, the
                                        # answer after </think>); lenient: any \\boxed answer counts
    format_penalty: float = 0.0         # lenient only: subtracted without <answer>...\\boxed{}...</answer>
    truncation_penalty: float = 0.0     # lenient only: subtracted when cut at the length limit
    # --- algorithm ---
    algo: Algo = "grpo"                 # advantage estimator: a group baseline, or ppo (GAE with a critic)
    clip_low: float = 0.2               # PPO clip range below 1
    clip_high: float = 0.28             # and above 1 (clip-higher)
    dual_clip: float = 0.0              # dual clip for negative advantages (e.g. 3.0; 0 = off)
    loss_agg: Aggregation = "token_mean"   # how token losses add up to the mini-batch's loss
    kl_coef: float = 0.0                # KL to the starting policy (0 = no reference model in memory)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"   # Schulman's estimators of KL(policy || reference)
    kl_in_reward: bool = False          # subtract the KL from the reward instead of adding it to the loss
    entropy_coef: float = 0.0           # entropy bonus
    filter_groups: bool = False         # dynamic sampling: keep groups with accuracy in [min, max], refill
    filter_min_acc: float = 0.01        # the paper: 0 < accuracy < 0.8, i.e. [1/16, 0.75] at n = 16
    filter_max_acc: float = 0.8
    max_refill_rounds: int = 3          # sampling rounds per step when filters drop groups or responses
    roc_oversample: int = 1             # GRPO-RoC (rStar2-Agent): sample this many x n_samples responses per problem
                                        # and keep n_samples, the correct ones with the fewest tool errors and
                                        # format problems (minitir/roc.py); 1 = off, the paper's rStar2: 2
    mask_truncated: bool = False        # keep responses cut at the length limit out of the loss
    filter_overlong: bool = False       # the paper: drop responses cut at the length limit (not correct)
    filter_repetition: float = 0.0      # the paper (0.05): drop correct responses repeating more than this
    carry_over: bool = False            # the paper: survivors fill one batch, the surplus waits for the next step
                                        # with the log-probs of the weights that made it (then off-policy)
    mask_void_turns: bool = False       # beyond the paper: mask responses with code that never ran or no answer
    tis_cap: float = 0.0                # truncated importance sampling: weight min(pi_old / pi_generator, cap) per
                                        # token (0 = off; the presets: 2.0, see benchmarks/logprob_gap.py)
    ppo_epochs: int = 1                 # passes over each step's samples
    mini_batches: int = 1               # optimizer steps per pass (the paper: 1 step per rollout)
    micro_batch_tokens: int = 8192      # tokens per forward/backward (gradients accumulate over micro-batches)
    # --- optimiser ---
    lr: float = 1e-6                    # AdamW learning rate
    adam_betas: tuple[float, float] = (0.9, 0.999)   # the paper: (0.9, 0.95)
    weight_decay: float = 0.0           # AdamW weight decay
    grad_clip: float = 1.0              # gradient norm clip
    warmup_steps: int = 0               # linear warm-up (optimizer steps)
    lr_schedule: Literal["constant", "cosine"] = "constant"   # after warm-up
    # --- critic (ppo) ---
    critic_lr: float = 1e-5             # the critic's AdamW learning rate
    value_clip: float = 0.2             # value clipping around the old values
    gamma: float = 1.0                  # GAE discount
    lam: float = 1.0                    # GAE lambda
    # --- run ---
    steps: int = 100                    # training steps
    seed: int = 0                       # data order, sampling streams and initialisation
    run_dir: str = "runs"               # runs go to run_dir/run_name
    run_name: str = ""                  # "" = a timestamp
    save_every: int = 50                # steps between checkpoints (and one at the end; 0 = at the end only)
    keep_checkpoints: int = 2           # the newest checkpoints kept
    tensorboard: bool = True            # also write metrics for TensorBoard (when it is installed)
    log_samples: int = 4                # rollouts per step written to runs/NAME/samples.jsonl (full text)
    print_every: int = 5                # print one rollout every this many steps (0 = never)


class ConfigError(ValueError):
    pass


def compute_dtype(dtype: str, device: torch.device) -> str:
    """What a run computes in: --dtype itself, or for auto bfloat16 on CUDA and on CPUs whose matrix units
    multiply bfloat16 natively (AVX512-BF16, AMX), float32 on other CPUs (there bfloat16 products are
    emulated, slower than float32)."""
    if dtype != "auto":
        return dtype
    native = device.type == "cuda" or (device.type == "cpu" and torch.cpu._is_avx512_bf16_supported())
    return "bfloat16" if native else "float32"


def choices(name: str) -> tuple:
    """The allowed values of a Literal field of TrainConfig."""
    return typing.get_args(typing.get_type_hints(TrainConfig)[name])


def config_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def validate(cfg: TrainConfig):
    """Mistakes a user can make, reported before anything heavy runs, with what to change."""
    def bad(msg):
        raise ConfigError(msg)
    for f in fields(TrainConfig):
        allowed = choices(f.name)
        if allowed and isinstance(allowed[0], str) and getattr(cfg, f.name) not in allowed:
            bad(f"--{f.name.replace('_', '-')} {getattr(cfg, f.name)!r}: choose from {', '.join(allowed)}")
    need = cfg.max_prompt_tokens + cfg.max_new_tokens
    if cfg.micro_batch_tokens < need:
        bad(f"--micro-batch-tokens {cfg.micro_batch_tokens} cannot hold one sequence of up to {need} tokens "
            f"(--max-prompt-tokens + --max-new-tokens): raise it to at least {need} or lower those")
    if cfg.roc_oversample < 1 or (cfg.roc_oversample > 1 and cfg.n_samples < 4):
        bad(f"--roc-oversample {cfg.roc_oversample} with --n-samples {cfg.n_samples}: use 1 (off), or K >= 2 with "
            f"n_samples >= 4 (it keeps at least 2 correct and 2 incorrect responses of a mixed group)")
    if cfg.algo == "rloo" and cfg.n_samples < 2:
        bad("--algo rloo needs --n-samples >= 2")
    if cfg.prompts_per_step * cfg.n_samples < cfg.mini_batches:
        bad(f"--mini-batches {cfg.mini_batches} exceeds the {cfg.prompts_per_step * cfg.n_samples} responses per step")
    if not 0 <= cfg.filter_min_acc <= cfg.filter_max_acc <= 1:
        bad("--filter-min-acc / --filter-max-acc must satisfy 0 <= min <= max <= 1")
    unknown = set(cfg.lora_targets.split(",")) - set(LINEARS)
    if cfg.lora_rank < 0 or unknown or cfg.lora_alpha <= 0:
        bad(f"--lora-rank {cfg.lora_rank} / --lora-alpha {cfg.lora_alpha} / --lora-targets {cfg.lora_targets}: "
            f"rank >= 0 (0 = off), alpha > 0, targets among {','.join(LINEARS)}")
    if cfg.sandbox_memory_mb < 16:   # what a SandboxFusion server accepts; a run needs more anyway
        bad(f"--sandbox-memory-mb {cfg.sandbox_memory_mb}: at least 16 (MB per code run)")
    if cfg.tis_cap < 0 or (0 < cfg.tis_cap < 1):
        bad(f"--tis-cap {cfg.tis_cap}: use 0 (off) or a cap >= 1 (e.g. 2)")
