"""
Copy one step of a training run into a resume bundle small enough to commit.

    python scripts/make_resume_bundle.py LOGDIR STEP OUT_DIR [--opt_dtype bfloat16]

Writes OUT_DIR/modelNNNNNN.pt (the raw float32 weights, unchanged),
OUT_DIR/ema_<rate>_NNNNNN.pt for each EMA file of that step (unchanged),
OUT_DIR/optNNNNNN.pt with the optimizer's moment tensors stored in
--opt_dtype (bfloat16 halves the largest file; torch's optimizers cast the
state back to the parameters' dtype when it is loaded), OUT_DIR/model_flags.json
and OUT_DIR/step.txt, replacing the bundle of an earlier step in OUT_DIR.
Resume with `scripts/image_train.py ... --resume_checkpoint OUT_DIR/modelNNNNNN.pt`.
"""

import argparse
import glob
import os
import shutil
import sys

import torch as th

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from improved_diffusion.files.atomic import atomic_torch_save  # noqa: E402


def compact_optimizer_state(state_dict, dtype):
    """The optimizer state dict with its floating-point state tensors (not 'step') cast to dtype."""
    state = {
        key: {name: (value.to(dtype) if th.is_tensor(value) and value.is_floating_point()
                     and name != "step" else value)
              for name, value in entry.items()}
        for key, entry in state_dict["state"].items()
    }
    return dict(state_dict, state=state)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("logdir")
    parser.add_argument("step", type=int)
    parser.add_argument("out_dir")
    parser.add_argument("--opt_dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args(argv)

    model = os.path.join(args.logdir, f"model{args.step:06d}.pt")
    opt = os.path.join(args.logdir, f"opt{args.step:06d}.pt")
    emas = sorted(glob.glob(os.path.join(args.logdir, f"ema_*_{args.step:06d}.pt")))
    for path in (model, opt):
        if not os.path.isfile(path):
            print(f"error: {path}: no such file (is step {args.step} saved in {args.logdir}?)",
                  file=sys.stderr)
            return 2

    os.makedirs(args.out_dir, exist_ok=True)
    old = [f for f in os.listdir(args.out_dir) if f.endswith(".pt") or f == "step.txt"]
    opt_state = th.load(opt, map_location="cpu", weights_only=True)
    atomic_torch_save(compact_optimizer_state(opt_state, getattr(th, args.opt_dtype)),
                      os.path.join(args.out_dir, os.path.basename(opt)))
    for path in [model, *emas]:
        shutil.copyfile(path, os.path.join(args.out_dir, os.path.basename(path)))
    flags = os.path.join(args.logdir, "model_flags.json")
    if os.path.isfile(flags):
        shutil.copyfile(flags, os.path.join(args.out_dir, "model_flags.json"))
    keep = {os.path.basename(p) for p in (model, opt, *emas)}
    for name in old:
        if name not in keep:
            os.remove(os.path.join(args.out_dir, name))
    with open(os.path.join(args.out_dir, "step.txt"), "w") as f:
        f.write(f"{args.step}\n")
    print(f"bundle of step {args.step}: {sorted(keep)} in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
