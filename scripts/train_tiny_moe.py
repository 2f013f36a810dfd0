#!/usr/bin/env python3
"""Train the small MoE checkpoints shipped in ``expertflow_compile/assets/``.

Two architectures (``--arch``):

* ``mixtral`` (default): ``tiny_mixtral``, Mixtral's routing shape (8 experts, top-2);
* ``qwen2_moe``: ``tiny_qwen2_moe``, Qwen1.5-MoE-A2.7B's routing shape (60 routed
  experts, top-4, softmax scores not renormalised over the top-4, plus one always-on
  shared expert behind a sigmoid gate).

Each architecture has its own defaults (``ARCH_DEFAULTS``); an option given on the
command line wins.  With no option beyond ``--arch``/``--out-dir``, ``mixtral``
gives exactly the arguments that produced ``tiny_mixtral``.

Pipeline (CPU only, one thread by default):

1. corpus: the Python 3.11 documentation sources from the Debian package
   ``python3.11-doc`` (PSF License), split by document into train / held-out
   (see ``scripts/prepare_corpus.py``);
2. tokenizer: byte-level BPE (``tokenizers``) trained on the train split only
   (deterministic: the same split and vocab size give the same ``tokenizer.json``,
   so both shipped models share one vocabulary);
3. model: ``MixtralForCausalLM`` or ``Qwen2MoeForCausalLM`` from its config;
4. loss: LM cross-entropy + a Switch-style load-balancing loss computed
   separately for EVERY layer from that layer's router logits and summed over
   layers (``E * sum_e f_e * P_e`` per layer);
5. AdamW, linear warm-up then cosine decay; training stops at ``--steps`` or
   after ``--minutes`` of wall time, whichever comes first (the LR schedule
   follows whichever budget is closer to being used up);
6. evaluation on held-out documents (perplexity, per-layer routing balance),
   checkpoint written with ``save_pretrained`` (weights stored as bf16 by
   default) and reloaded/verified with ``AutoModelForCausalLM``.

Examples (the commands used for the shipped checkpoints are in
``expertflow_compile/assets/README.md``)::

    python scripts/train_tiny_moe.py --minutes 25 \
        --out-dir expertflow_compile/assets/tiny_mixtral \
        --heldout-sample expertflow_compile/assets/heldout.txt
    python scripts/train_tiny_moe.py --arch qwen2_moe --minutes 40 \
        --out-dir expertflow_compile/assets/tiny_qwen2_moe
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prepare_corpus  # noqa: E402

EOS = prepare_corpus.EOS_TOKEN


# --------------------------------------------------------------------------- utils
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------- tokenizer
def train_tokenizer(train_docs: list[dict], vocab_size: int, out_dir: str, max_len: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((d["text"] for d in train_docs), trainer=trainer, length=len(train_docs))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=max_len,
    )
    os.makedirs(out_dir, exist_ok=True)
    hf_tok.save_pretrained(out_dir)
    # Name the generic fast-tokenizer class so the directory loads with
    # AutoTokenizer in transformers 4.x as well as 5.x.
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        tcfg = json.load(f)
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tcfg["model_max_length"] = max_len
    with open(cfg_path, "w") as f:
        json.dump(tcfg, f, indent=2)
    return hf_tok


def encode_docs(tok, docs: list[dict], desc: str) -> np.ndarray:
    """Concatenate documents, each followed by the EOS token, into one id stream."""
    eos_id = tok.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    backend = tok.backend_tokenizer
    texts = [d["text"] for d in docs]
    batch = 32
    for i in tqdm(range(0, len(texts), batch), desc=f"tokenize {desc}", unit="batch", leave=False):
        for enc in backend.encode_batch(texts[i : i + batch], add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eos_id)
    return np.asarray(ids, dtype=np.int32)


# --------------------------------------------------------------------------- model
# Per-architecture defaults of the model-shape options (None on the command line =
# take these).  `mixtral` is what produced tiny_mixtral; `qwen2_moe` keeps
# Qwen1.5-MoE-A2.7B's conventions at a tiny width: 60 routed experts, top-4,
# norm_topk_prob False, a shared expert as wide as the top-4 routed experts together
# (5632 = 4 x 1408 there), multi-head attention (kv heads = heads) with q/k/v bias,
# RoPE theta 1e6, RMSNorm eps 1e-6, every layer sparse, untied embeddings.
ARCH_DEFAULTS = {
    "mixtral": dict(layers=6, hidden=128, intermediate=320, heads=4, kv_heads=2, experts=8, top_k=2,
                    shared_intermediate=None, rope_theta=10000.0, rms_eps=1e-5, max_file_mb=20.0),
    "qwen2_moe": dict(layers=8, hidden=128, intermediate=64, heads=4, kv_heads=4, experts=60, top_k=4,
                      shared_intermediate=None, rope_theta=1e6, rms_eps=1e-6, max_file_mb=35.0),
}
ARCH_CLASS = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}


def resolve_arch_defaults(args) -> None:
    """Fill every model-shape option left at None from ARCH_DEFAULTS[args.arch]."""
    for key, value in ARCH_DEFAULTS[args.arch].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.arch == "qwen2_moe" and args.shared_intermediate is None:
        args.shared_intermediate = args.top_k * args.intermediate
    if args.arch == "mixtral" and args.shared_intermediate is not None:
        raise SystemExit("--shared-intermediate is for --arch qwen2_moe (Mixtral has no shared expert)")


def num_experts_of(cfg) -> int:
    """Routed experts per MoE layer, whatever the config calls them."""
    return cfg.num_local_experts if hasattr(cfg, "num_local_experts") else cfg.num_experts


def build_model(args, vocab_size: int, eos_id: int):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_pos,
        num_experts_per_tok=args.top_k,
        router_aux_loss_coef=args.aux_coef,
        output_router_logits=False,
        tie_word_embeddings=args.tie_embeddings,
        rms_norm_eps=args.rms_eps,
        rope_theta=args.rope_theta,
        attention_dropout=0.0,
        initializer_range=0.02,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        use_cache=True,
    )
    if args.arch == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        config = MixtralConfig(
            **common,
            intermediate_size=args.intermediate,
            head_dim=args.hidden // args.heads,
            num_local_experts=args.experts,
            sliding_window=None,
        )
        return MixtralForCausalLM(config)
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(
        **common,
        moe_intermediate_size=args.intermediate,
        shared_expert_intermediate_size=args.shared_intermediate,
        intermediate_size=args.shared_intermediate,  # dense-MLP width; unused (every layer is sparse)
        num_experts=args.experts,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        use_sliding_window=False,
        qkv_bias=True,
    )
    return Qwen2MoeForCausalLM(config)


def count_params(model) -> dict:
    """Parameter counts; `experts` are the routed experts only (a shared expert is
    always active and counts as dense)."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    shared = sum(p.numel() for n, p in model.named_parameters() if ".shared_expert" in n)
    cfg = model.config
    per_expert = experts // (cfg.num_hidden_layers * num_experts_of(cfg))
    active = total - experts + cfg.num_hidden_layers * cfg.num_experts_per_tok * per_expert
    emb = model.model.embed_tokens.weight.numel()
    sizes = {
        "total": total,
        "experts": experts,
        "per_expert": per_expert,
        "active_per_token": active,
        "non_embedding": total - emb - (0 if cfg.tie_word_embeddings else model.lm_head.weight.numel()),
    }
    if shared:
        sizes["shared_experts"] = shared
    return sizes


# ---------------------------------------------------------------------------- loss
def per_layer_balance_loss(router_logits, num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss, computed per layer, returned per layer.

    For a layer with router logits ``z`` (tokens x E):
        P_e = mean_t softmax(z_t)_e                (differentiable)
        f_e = fraction of the token->expert assignments (top-k) that go to e
        loss = E * sum_e f_e * P_e                 (== 1 when perfectly balanced)
    """
    losses = []
    for z in router_logits:
        probs = torch.softmax(z.float(), dim=-1)
        topk = torch.topk(probs, top_k, dim=-1).indices
        with torch.no_grad():
            counts = torch.bincount(topk.reshape(-1), minlength=num_experts).float()
            f = counts / counts.sum()
        P = probs.mean(dim=0)
        losses.append(num_experts * torch.sum(f * P))
    return torch.stack(losses)


# ---------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(model, ids: np.ndarray, seq_len: int, max_tokens: int, batch_size: int = 8, desc="eval"):
    """Perplexity on non-overlapping windows + per-layer routing statistics."""
    model.eval()
    cfg = model.config
    E, K = num_experts_of(cfg), cfg.num_experts_per_tok
    n_win = min(max_tokens, len(ids) - 1) // seq_len
    windows = [ids[i * seq_len : i * seq_len + seq_len + 1] for i in range(n_win)]
    nll, ntok = 0.0, 0
    counts = torch.zeros(cfg.num_hidden_layers, E, dtype=torch.float64)
    top1_prob = torch.zeros(cfg.num_hidden_layers, dtype=torch.float64)
    for i in tqdm(range(0, n_win, batch_size), desc=desc, unit="batch", leave=False):
        chunk = torch.from_numpy(np.stack(windows[i : i + batch_size]).astype(np.int64))
        x, y = chunk[:, :-1], chunk[:, 1:]
        out = model(input_ids=x, output_router_logits=True, use_cache=False)
        nll += F.cross_entropy(out.logits.float().reshape(-1, out.logits.size(-1)), y.reshape(-1), reduction="sum").item()
        ntok += y.numel()
        for layer, z in enumerate(out.router_logits):
            top = torch.topk(z.float(), K, dim=-1).indices.reshape(-1)
            counts[layer] += torch.bincount(top, minlength=E).double()
            top1_prob[layer] += torch.softmax(z.float(), dim=-1).max(dim=-1).values.sum().double()
    model.train()
    share = counts / counts.sum(dim=1, keepdim=True)
    return {
        "tokens": ntok,
        "loss": nll / ntok,
        "perplexity": math.exp(nll / ntok),
        "max_expert_share_per_layer": [round(v, 4) for v in share.max(dim=1).values.tolist()],
        "min_expert_share_per_layer": [round(v, 4) for v in share.min(dim=1).values.tolist()],
        "dead_experts_per_layer": [int(v) for v in (counts == 0).sum(dim=1).tolist()],
        # 1/E for a uniform router (~0.17 at random init for 8 experts); higher = confident, token-dependent routing
        "mean_top1_router_prob_per_layer": [round(v, 4) for v in (top1_prob / ntok).tolist()],
        "expert_share": [[round(v, 4) for v in row] for row in share.tolist()],
    }


# ------------------------------------------------------------------------ training
def lr_at(progress: float, step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    p = min(max(progress, 0.0), 1.0)
    min_lr = args.lr * args.min_lr_frac
    return min_lr + 0.5 * (args.lr - min_lr) * (1.0 + math.cos(math.pi * p))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    p.add_argument("--source-dir", default=prepare_corpus.DEFAULT_SOURCE)
    p.add_argument("--work-dir", default="/tmp/tiny_moe_work", help="corpus cache / scratch directory")
    p.add_argument("--out-dir", required=True, help="checkpoint directory (config, weights, tokenizer, report)")
    p.add_argument("--heldout-sample", default=None, help="where to write <=200KB of held-out text")
    p.add_argument("--vocab-size", type=int, default=4096)
    # model (None = the --arch default, see ARCH_DEFAULTS)
    p.add_argument("--arch", choices=sorted(ARCH_DEFAULTS), default="mixtral")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--intermediate", type=int, default=None, help="width of one routed expert")
    p.add_argument("--shared-intermediate", type=int, default=None,
                   help="qwen2_moe: width of the shared expert (default top_k x intermediate)")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--experts", type=int, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--rope-theta", type=float, default=None)
    p.add_argument("--rms-eps", type=float, default=None)
    p.add_argument("--max-pos", type=int, default=512)
    p.add_argument("--tie-embeddings", action="store_true")
    # optimisation
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2.5e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--aux-coef", type=float, default=0.02, help="weight of the summed per-layer balance loss")
    p.add_argument("--steps", type=int, default=100_000, help="hard cap on optimizer steps")
    p.add_argument("--minutes", type=float, default=25.0, help="wall-time budget for the training loop")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--log-every", type=int, default=25)
    # eval / export
    p.add_argument("--eval-tokens", type=int, default=100_000)
    p.add_argument("--save-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--max-file-mb", type=float, default=None)
    args = p.parse_args(argv)
    resolve_arch_defaults(args)

    torch.set_num_threads(args.threads)
    set_seed(args.seed)
    t_start = time.time()

    # ---- corpus
    corpus_dir = os.path.join(args.work_dir, "corpus")
    meta = prepare_corpus.build(args.source_dir, corpus_dir, args.heldout_sample, 200_000)
    train_docs = load_jsonl(os.path.join(corpus_dir, "train.jsonl"))
    held_docs = load_jsonl(os.path.join(corpus_dir, "heldout.jsonl"))
    print(f"corpus: {meta['n_train_documents']} train docs ({meta['train_bytes']/1e6:.2f} MB), "
          f"{meta['n_heldout_documents']} held-out docs ({meta['heldout_bytes']/1e6:.2f} MB)", flush=True)

    # ---- tokenizer (train split only)
    t0 = time.time()
    tok = train_tokenizer(train_docs, args.vocab_size, args.out_dir, args.max_pos)
    eos_id = tok.convert_tokens_to_ids(EOS)
    train_ids = encode_docs(tok, train_docs, "train")
    held_ids = encode_docs(tok, held_docs, "heldout")
    print(f"tokenizer: vocab {len(tok)}, train tokens {len(train_ids):,}, held-out tokens {len(held_ids):,} "
          f"({time.time()-t0:.1f}s)", flush=True)

    # ---- model
    set_seed(args.seed)
    model = build_model(args, len(tok), eos_id)
    model.train()
    sizes = count_params(model)
    print("params:", json.dumps(sizes), flush=True)

    decay, no_decay = [], []
    for n, prm in model.named_parameters():
        (decay if prm.dim() >= 2 and "norm" not in n else no_decay).append(prm)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )

    # ---- training loop
    gen = torch.Generator().manual_seed(args.seed)
    train_t = torch.from_numpy(train_ids.astype(np.int64))
    n_start = len(train_ids) - args.seq_len - 1
    budget_s = args.minutes * 60.0
    E, K = args.experts, args.top_k
    history = []
    ema_loss = ema_aux = None
    tokens_seen = 0
    t_train = time.time()
    step = 0
    stop_reason = "steps"
    pbar = tqdm(total=args.steps, desc="train", unit="step", dynamic_ncols=True, mininterval=5.0)
    while step < args.steps:
        elapsed = time.time() - t_train
        if elapsed >= budget_s:
            stop_reason = "minutes"
            break
        progress = max(step / args.steps, elapsed / budget_s)
        lr = lr_at(progress, step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, n_start, (args.batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(args.seq_len + 1)[None, :]
        chunk = train_t[idx]
        x, y = chunk[:, :-1], chunk[:, 1:]
        out = model(input_ids=x, output_router_logits=True, use_cache=False)
        ce = F.cross_entropy(out.logits.reshape(-1, out.logits.size(-1)).float(), y.reshape(-1))
        aux_layers = per_layer_balance_loss(out.router_logits, E, K)
        aux = aux_layers.sum()
        loss = ce + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        tokens_seen += x.numel()
        ce_v, aux_v = ce.item(), aux.item()
        ema_loss = ce_v if ema_loss is None else 0.98 * ema_loss + 0.02 * ce_v
        ema_aux = aux_v if ema_aux is None else 0.98 * ema_aux + 0.02 * aux_v
        pbar.update(1)
        if step % args.log_every == 0 or step == 1:
            el = time.time() - t_train
            rec = {
                "step": step, "elapsed_s": round(el, 1), "lr": lr, "ce": round(ce_v, 4),
                "ce_ema": round(ema_loss, 4), "aux_sum": round(aux_v, 4),
                "aux_per_layer": [round(v, 3) for v in aux_layers.tolist()],
                "grad_norm": round(float(gnorm), 3), "tok_per_s": round(tokens_seen / el, 1),
            }
            history.append(rec)
            pbar.set_postfix(ce=f"{ema_loss:.3f}", aux=f"{ema_aux:.2f}", lr=f"{lr:.1e}", tps=f"{tokens_seen/el:.0f}")
            tqdm.write(json.dumps(rec))
            sys.stdout.flush()
    pbar.close()
    train_wall = time.time() - t_train
    print(f"training stopped ({stop_reason}) after {step} steps, {tokens_seen:,} tokens, "
          f"{train_wall/60:.2f} min, {tokens_seen/train_wall:.0f} tok/s; train CE (EMA) {ema_loss:.4f}", flush=True)

    # ---- eval of the fp32 in-memory model
    ev32 = evaluate(model, held_ids, args.seq_len, args.eval_tokens, desc="eval fp32")
    print(f"held-out (fp32 weights): loss {ev32['loss']:.4f}  ppl {ev32['perplexity']:.2f}", flush=True)

    # ---- export
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.makedirs(args.out_dir, exist_ok=True)
    save_dtype = getattr(torch, args.save_dtype)
    model.config.output_router_logits = False
    model.to(save_dtype)
    model.config.dtype = args.save_dtype
    model.save_pretrained(args.out_dir, safe_serialization=True)
    wpath = os.path.join(args.out_dir, "model.safetensors")
    os.chmod(wpath, 0o644)
    file_mb = os.path.getsize(wpath) / 2**20
    print(f"saved {wpath}: {file_mb:.2f} MiB ({args.save_dtype})", flush=True)
    if file_mb > args.max_file_mb:
        print(f"WARNING: checkpoint exceeds {args.max_file_mb} MiB", flush=True)

    # ---- reload exactly as a user would, evaluate the shipped weights, generate
    tok2 = AutoTokenizer.from_pretrained(args.out_dir)
    m2 = AutoModelForCausalLM.from_pretrained(args.out_dir, dtype=torch.float32)
    m2.eval()
    ev = evaluate(m2, held_ids, args.seq_len, args.eval_tokens, desc="eval shipped")
    print(f"held-out (shipped {args.save_dtype} weights, fp32 compute): loss {ev['loss']:.4f} "
          f"ppl {ev['perplexity']:.2f}", flush=True)
    print("max expert share per layer:", ev["max_expert_share_per_layer"], flush=True)
    print("dead experts per layer:", ev["dead_experts_per_layer"], flush=True)

    prompt = "The :mod:`json` module"
    enc = tok2(prompt, return_tensors="pt")
    with torch.no_grad():
        gen_ids = m2.generate(**enc, max_new_tokens=40, do_sample=False, pad_token_id=eos_id)
    sample = tok2.decode(gen_ids[0], skip_special_tokens=False)
    print("greedy sample:", repr(sample), flush=True)

    # ---- report
    cfg = m2.config
    report = {
        "corpus": {
            "name": meta["corpus"],
            "source": meta["source_dir"],
            "debian_package": "python3.11-doc",
            "license": meta["license"],
            "copyright_file": meta["copyright_file"],
            "split": meta["split_rule"],
            "n_train_documents": meta["n_train_documents"],
            "n_heldout_documents": meta["n_heldout_documents"],
            "train_bytes": meta["train_bytes"],
            "heldout_bytes": meta["heldout_bytes"],
            "train_tokens": int(len(train_ids)),
            "heldout_tokens": int(len(held_ids)),
            "heldout_documents": meta["heldout_documents"],
            "heldout_sample_file": os.path.basename(args.heldout_sample) if args.heldout_sample else None,
            "heldout_sample_documents": meta["heldout_sample_documents"],
        },
        "tokenizer": {"type": "byte-level BPE (tokenizers)", "vocab_size": len(tok), "eos_token": EOS,
                      "eos_token_id": eos_id, "trained_on": "train split only"},
        "model": {
            "architecture": ARCH_CLASS[args.arch],
            "num_hidden_layers": cfg.num_hidden_layers,
            "hidden_size": cfg.hidden_size,
            **({"intermediate_size": cfg.intermediate_size, "num_local_experts": cfg.num_local_experts}
               if args.arch == "mixtral" else
               {"moe_intermediate_size": cfg.moe_intermediate_size,
                "shared_expert_intermediate_size": cfg.shared_expert_intermediate_size,
                "num_experts": cfg.num_experts, "norm_topk_prob": cfg.norm_topk_prob}),
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "num_experts_per_tok": cfg.num_experts_per_tok,
            "max_position_embeddings": cfg.max_position_embeddings,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "params": sizes,
            "stored_dtype": args.save_dtype,
            "model_safetensors_bytes": os.path.getsize(wpath),
            "model_safetensors_mib": round(file_mb, 3),
        },
        "training": {
            "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
            "args": vars(args),
            "loss": "cross-entropy + aux_coef * sum_over_layers(E * sum_e f_e * P_e)  (per-layer Switch balance loss)",
            "optimizer": "AdamW(betas=(0.9,0.95)), linear warm-up then cosine decay to min_lr_frac*lr",
            "steps": step,
            "stop_reason": stop_reason,
            "tokens_seen": tokens_seen,
            "epochs_over_train_tokens": round(tokens_seen / len(train_ids), 3),
            "train_wall_time_s": round(train_wall, 1),
            "total_wall_time_s": None,
            "tokens_per_s": round(tokens_seen / train_wall, 1),
            "threads": args.threads,
            "final_train_ce_ema": round(ema_loss, 4),
            "final_train_aux_per_layer": history[-1]["aux_per_layer"] if history else None,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "tokenizers": __import__("tokenizers").__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "history": history,
        },
        "heldout_eval": {
            "tokens": ev["tokens"],
            "seq_len": args.seq_len,
            "loss": round(ev["loss"], 4),
            "perplexity": round(ev["perplexity"], 3),
            "perplexity_fp32_before_export": round(ev32["perplexity"], 3),
            "routing": {
                "counted": f"top-{K} assignments on held-out tokens",
                "uniform_share": 1.0 / E,
                "max_expert_share_per_layer": ev["max_expert_share_per_layer"],
                "min_expert_share_per_layer": ev["min_expert_share_per_layer"],
                "dead_experts_per_layer": ev["dead_experts_per_layer"],
                "mean_top1_router_prob_per_layer": ev["mean_top1_router_prob_per_layer"],
                "expert_share": ev["expert_share"],
            },
        },
        "greedy_sample": {"prompt": prompt, "max_new_tokens": 40, "text": sample},
    }
    report["training"]["total_wall_time_s"] = round(time.time() - t_start, 1)
    with open(os.path.join(args.out_dir, "training_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {os.path.join(args.out_dir, 'training_report.json')}; total wall {time.time()-t_start:.0f}s",
          flush=True)


if __name__ == "__main__":
    main()
