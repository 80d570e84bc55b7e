"""Diagnosis: why do references not raise membrane F1 on ISBI 2012?

Issue 4 asks the reference-assisted network to beat the same network without
references, and, if it does not, to find out why. This script measures the
candidate explanations on a **validation split** (train on slices 0-15, or on
[0, 10] few-shot; score on 16-19; the test slices 20-29 are never touched),
with the product's own training and prediction code:

* branch decomposition of the reference network: the segmentation head alone,
  the attention readout alone, and the fused prediction;
* dependence on the references: 1 retrieved reference crop vs 4 (default) vs
  16 with 8x more keys and sharper attention; 4 *random* reference crops
  instead of the retrieved ones (mean absolute change of the attention map);
  for the few-shot model, the 16 annotated slices instead of its 2 training
  slices (references that carry information the weights do not have);
* "self-support": the target's own confident pixels added as a reference;
* forced reliance: the reference network trained with the fusion weight
  started at 1 (instead of 0) and sharp attention (softmax scale 30 instead of
  10) with a stronger attention loss, so it cannot start by ignoring them;
* data vs training compute (``--long``): the baseline with 2 vs 16 training
  slices at the benchmark budget (600 steps) and at 4x that budget.

Run one seed per process (2 cores: two seeds side by side), then assemble:

    .venv/bin/python benchmarks/diag_membrane.py --seed 0 > /tmp/diag0.log &
    .venv/bin/python benchmarks/diag_membrane.py --seed 1 > /tmp/diag1.log
    .venv/bin/python benchmarks/diag_membrane.py --assemble /tmp/diag0.log /tmp/diag1.log

Writes benchmarks/results/membrane_diagnosis.json and docs/benchmarks/membrane_diagnosis.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import bench_membrane as B  # noqa: E402
from napari_leakseg import membrane as M  # noqa: E402

TRAIN = {"full": list(range(16)), "few": [0, 10]}
VAL = list(range(16, 20))
CPU = torch.device("cpu")


def train(ims, lbs, seed, steps, use_reference=True, forced=False):
    kw = dict(membrane_value=0, epochs=3, steps_per_epoch=steps // 3, batch_size=4, crop=128, seed=seed,
              device="cpu", feedback=False)
    if not forced:
        t0 = time.perf_counter()
        tm = M.train_membrane(ims, lbs, use_reference=use_reference, **kw)
        return tm, time.perf_counter() - t0
    # same architecture; the fusion weight starts at 1 and the softmax scale at 30 (sharp attention)
    torch.manual_seed(seed)
    net = M.MembraneNet(**dict(M.DEFAULT_ARCH, feedback=False))
    with torch.no_grad():
        net.fuse.fill_(1.0)
        net.log_scale.fill_(math.log(30.0))
    start = M.TrainedMembrane(net, M._metadata(net.arch, {}, 0))
    t0 = time.perf_counter()
    tm = M.train_membrane(ims, lbs, init=start, aux_weight=1.0, **kw)
    return tm, time.perf_counter() - t0


@torch.no_grad()
def outputs(m, bank, img, n_refs=4, scale=None, w=None, idx=None, self_support=False, gen=None):
    """head / attention / fused probabilities of one 512x512 image (``MembraneNet.fuse_logits``, unfolded)."""
    x = torch.from_numpy(M.normalize(img))[None, None]
    f, e = m.encode(x)
    if idx is None:
        idx = bank.retrieve(e[0].mean((1, 2)), n_refs)
    keys, vals = bank.keys[idx][None], bank.vals[idx][None]
    head = m.head(f)

    def attn(keys, vals):  # the network's own attention readout, optionally at another softmax scale
        if scale is None:
            return m.fuse_logits(f, e, keys, vals)[1]
        saved = m.log_scale.detach().clone()
        m.log_scale.fill_(math.log(scale))
        try:
            return m.fuse_logits(f, e, keys, vals)[1]
        finally:
            m.log_scale.copy_(saved)

    p = attn(keys, vals)
    if self_support:  # the target's own confident pixels as one more reference
        p1 = torch.sigmoid(head + m.fuse * torch.logit(p.clamp(1e-4, 1 - 1e-4)))[0, 0]
        lab = torch.full_like(p1, float("nan"))
        lab[p1 > 0.9] = 1
        lab[p1 < 0.1] = 0
        sk, sv = M.sample_keys(e[0], lab, keys.shape[2], gen)
        p = attn(torch.cat([keys, sk[None, None]], 1), torch.cat([vals, sv[None, None]], 1))
    wt = m.fuse if w is None else torch.tensor(float(w))
    fused = torch.sigmoid(head + wt * torch.logit(p.clamp(1e-4, 1 - 1e-4)))
    return torch.sigmoid(head)[0, 0].numpy(), p[0, 0].numpy(), fused[0, 0].numpy()


def run_seed(seed, steps, long, log):
    d = B.data_dir()
    vims, vlbs = B.load(d, VAL)
    all_ims, all_lbs = B.load(d, range(16))

    def emit(setting, method, probs, **extra):
        sc = B.scores(probs, vlbs, 30)
        row = dict(setting=setting, method=method, seed=seed, **{k: round(v, 4) for k, v in sc.items()}, **extra)
        log(row)

    for setting, ids in TRAIN.items():
        ims, lbs = B.load(d, ids)
        pairs, _ = M.prepare_references(ims, lbs, 0)
        base, tb = train(ims, lbs, seed, steps, use_reference=False)
        bp = M.MembranePredictor(base, device="cpu")
        emit(setting, "baseline (no references)", [bp.probability(im) for im in vims], train_s=round(tb, 1))
        for forced in (False, True):
            tm, tt = train(ims, lbs, seed, steps, forced=forced)
            m = tm.model.eval()
            tag = "forced reliance" if forced else "ours"
            info = dict(train_s=round(tt, 1), fuse_w=round(float(m.fuse.detach()), 3),
                        scale=round(float(m.log_scale.exp().detach()), 1))
            bank = M.build_bank(m, pairs, CPU, seed=seed)
            outs = [outputs(m, bank, im) for im in vims]
            check = M.MembranePredictor(tm, device="cpu")
            check.bank = bank
            gap = float(np.abs(check.probability(vims[0]) - outs[0][2]).max())
            assert gap < 1e-4, f"the unfolded prediction differs from MembranePredictor by {gap}"
            emit(setting, f"{tag}: fused (default)", [o[2] for o in outs], **info)
            if not forced:
                emit(setting, f"{tag}: head alone", [o[0] for o in outs])
                emit(setting, f"{tag}: attention alone", [o[1] for o in outs])
                emit(setting, f"{tag}: 1 reference crop", [outputs(m, bank, im, n_refs=1)[2] for im in vims])
                big = M.build_bank(m, pairs, CPU, keys_per_ref=1024, seed=seed)
                emit(setting, f"{tag}: 16 crops x 1024 keys, sharp (scale 40), w 1",
                     [outputs(m, big, im, n_refs=16, scale=40, w=1.0)[2] for im in vims])
                g = torch.Generator().manual_seed(seed)
                emit(setting, f"{tag}: + self-support (own confident pixels)",
                     [outputs(m, bank, im, self_support=True, gen=g)[2] for im in vims])
            # how much does the attention map move when the references are 4 random crops?
            rng = np.random.default_rng(seed)
            rnd = [outputs(m, bank, im, idx=torch.from_numpy(rng.choice(len(bank), min(4, len(bank)), replace=False)))
                   for im in vims]
            dp = float(np.mean([np.abs(a[1] - b[1]).mean() for a, b in zip(outs, rnd)]))
            emit(setting, f"{tag}: 4 random reference crops", [o[2] for o in rnd], attn_change=round(dp, 4))
            if setting == "few":
                more = M.build_bank(m, M.prepare_references(all_ims, all_lbs, 0)[0], CPU, seed=seed)
                emit(setting, f"{tag}: 16 annotated slices as references (2 trained)",
                     [outputs(m, more, im)[2] for im in vims])
        if long:
            lb, tl = train(ims, lbs, seed, 4 * steps, use_reference=False)
            lp = M.MembranePredictor(lb, device="cpu")
            emit(setting, f"baseline (no references), {4 * steps} steps", [lp.probability(im) for im in vims],
                 train_s=round(tl, 1))


def summarize(rows):
    out = []
    for (setting, method), rs in B.by_method(rows).items():
        s = dict(setting=setting, method=method, seeds=[r["seed"] for r in rs])
        for k in ("f1", "adapted_rand_error", "fuse_w", "attn_change", "train_s"):
            v = [r[k] for r in rs if r.get(k) is not None]
            if v:
                s[k] = float(np.mean(v))
        out.append(s)
    return out


def table(summary):
    base = {s["setting"]: s for s in summary if s["method"] == "baseline (no references)"}
    out = ["| setting | variant | seeds | F1 ↑ | ΔF1 vs baseline | adapted Rand err ↓ | fusion w | "
           "attention change |", "|" + "---|" * 8]
    for s in summary:
        b = base.get(s["setting"])
        df = "" if b is None or s is b else f"{s['f1'] - b['f1']:+.3f}"
        w = f"{s['fuse_w']:.2f}" if "fuse_w" in s else ""
        ch = f"{s['attn_change']:.3f}" if "attn_change" in s else ""
        out.append(f"| {s['setting']} | {s['method']} | {len(s['seeds'])} | {s['f1']:.3f} | {df} | "
                   f"{s['adapted_rand_error']:.3f} | {w} | {ch} |")
    return "\n".join(out)


def write(rows, out, md, note=""):
    summary = summarize(rows)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(dict(summary=summary, rows=rows, train=TRAIN, validate=VAL, note=note), indent=1))
    text = ["## Membrane: why references do not raise F1 (diagnosis on a validation split)", "",
            f"Train on slices {TRAIN['full'][0]}–{TRAIN['full'][-1]} (full) or {TRAIN['few']} (few-shot), "
            f"score on slices {VAL[0]}–{VAL[-1]}; the test slices 20–29 are not used. Same 600-step budget "
            "as the benchmark, mean over seeds. 'fusion w': the learned weight of the attention logit; "
            "'attention change': mean |Δp| of the attention map when the 4 retrieved reference crops are "
            "replaced by 4 random ones (`benchmarks/diag_membrane.py`).", "", table(summary), ""]
    if note:
        text += [note, ""]
    Path(md).write_text("\n".join(text))
    print("\n".join(text))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--long", action="store_true", help="also train the baseline for 4x the steps")
    ap.add_argument("--assemble", nargs="+", metavar="LOG")
    ap.add_argument("--note", help="markdown appended to the fragment (analysis)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "membrane_diagnosis.json"))
    ap.add_argument("--md", default=str(ROOT / "docs" / "benchmarks" / "membrane_diagnosis.md"))
    args = ap.parse_args(argv)
    if not (B.data_dir() / "image" / "0.png").exists():
        print(f"ISBI 2012 data not found at {B.data_dir()}; set LEAKSEG_DATA", file=sys.stderr)
        return 1
    if args.assemble:
        rows = [json.loads(ln) for log in args.assemble for ln in Path(log).read_text().splitlines()
                if ln.startswith("{")]
        note = Path(args.note).read_text().strip() if args.note else ""
        write(rows, args.out, args.md, note)
        return 0
    torch.set_num_threads(args.threads)
    run_seed(args.seed, args.steps, args.long, lambda r: print(json.dumps(r), flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
