"""
Like image_sample.py, but with classifier guidance on top of Self-Attention
Guidance: a noisy-image classifier steers every step towards the drawn label.
Labels are always drawn (arr_1), as in the published script;
``--classifier_guidance False`` samples without the classifier (which is
then not loaded, though --classifier_path is accepted).

    mpiexec -n N python scripts/classifier_sample.py $SAG_FLAGS $MODEL_FLAGS \
        --classifier_scale 0.5 --classifier_path models/128x128_classifier.pt \
        --model_path models/128x128_diffusion.pt $SAMPLE_FLAGS
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from improved_diffusion import cli, dist_util  # noqa: E402
from improved_diffusion.sampling import drawer  # noqa: E402
from improved_diffusion.checkpoints.loading import classifier_from_args, model_from_args  # noqa: E402
from improved_diffusion.guidance.sag import SelfAttentionGuidance  # noqa: E402
from improved_diffusion.run.sample_run import Batches, sample_to_npz  # noqa: E402


def main(argv=None):
    args = cli.parse_sample_args(create_argparser(), argv)
    guided = args.classifier_guidance
    if guided and not args.classifier_path:
        raise cli.pure_usage_error(
            "--classifier_guidance True needs --classifier_path (a noisy-image classifier, "
            "e.g. models/128x128_classifier.pt); or pass --classifier_guidance False"
        )
    dist_util.setup_dist()
    files = {"model_path": args.model_path}
    if guided:
        files["classifier_path"] = args.classifier_path

    def setup(log_dir):
        model, diffusion = cli.agree(model_from_args, args)
        sag = cli.agree(SelfAttentionGuidance.from_args, model, args)
        classifier = cli.agree(classifier_from_args, args) if guided else None
        draw = drawer.make_drawer(args, model, diffusion, sag, classifier, labels_always=True)

        guidance = (
            f"classifier guidance: scale {args.classifier_scale}, {args.classifier_path}"
            if guided else "classifier guidance off (--classifier_guidance False)"
        )
        return Batches(draw, drawer.describe_setup(args, model, draw, [guidance]),
                       drawer.sag_pictures(args, draw, log_dir))

    path = sample_to_npz(args, "classifier_sample", args.image_size, True, files, setup)
    if path:
        print(path, flush=True)


def create_argparser():
    return cli.sampling_argparser(__doc__, *cli.sample_flag_sets("classifier_sample"))


if __name__ == "__main__":
    cli.run_main(main)
