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

from improved_diffusion import dist_util  # noqa: E402
from improved_diffusion.sample_run import SampleRun, agree, report_result  # noqa: E402
from improved_diffusion.sample_util import (  # noqa: E402
    classifier_from_args,
    describe_setup,
    draw_batch,
    make_cond_fn,
    make_sag,
    model_from_args,
    new_parser,
    parse_args_with_card,
    pure_usage_error,
    run_main,
    sample_defaults,
    to_uint8,
    validate_sample_args,
)
from improved_diffusion.script_util import (  # noqa: E402
    add_dict_to_argparser,
    classifier_defaults,
    model_and_diffusion_defaults,
    sag_defaults,
)


def main(argv=None):
    args = parse_args_with_card(create_argparser(), argv)
    validate_sample_args(args)
    guided = args.classifier_guidance
    if guided and not args.classifier_path:
        raise pure_usage_error(
            "--classifier_guidance True needs --classifier_path (a noisy-image classifier, "
            "e.g. models/128x128_classifier.pt); or pass --classifier_guidance False"
        )
    dist_util.setup_dist()
    files = {"model_path": args.model_path}
    if guided:
        files["classifier_path"] = args.classifier_path
    with SampleRun(args, "classifier_sample", args.image_size, True, files) as run:
        if run.prepare():
            model, diffusion = agree(model_from_args, args)
            cond_fn = None
            if guided:
                classifier = agree(classifier_from_args, args)
                cond_fn = make_cond_fn(classifier, args.classifier_scale)
            sag = agree(make_sag, model, args)
            device = dist_util.dev()

            def model_fn(x, t, y=None, **kwargs):
                # Labels are drawn for the classifier; the model sees them if it is conditional.
                return model(x, t, y if args.class_cond else None, **kwargs)

            def draw(positions, step_callback=None):
                sample, labels = draw_batch(
                    diffusion, model_fn, positions, args,
                    (3, args.image_size, args.image_size), device,
                    draw_labels=True, num_classes=args.num_classes,
                    cond_fn=cond_fn, sag=sag, step_callback=step_callback,
                )
                return to_uint8(sample, positions), labels.cpu().numpy()

            guidance = (
                f"classifier guidance: scale {args.classifier_scale}, {args.classifier_path}"
                if guided else "classifier guidance off (--classifier_guidance False)"
            )
            run.start(describe_setup(args, model, diffusion, sag, [guidance]))
            run.sample(draw, sag=sag, diffusion=diffusion)
            run.finish()
    report_result(run)


def create_argparser():
    defaults = sample_defaults()
    defaults.update(model_and_diffusion_defaults())
    defaults.update(classifier_defaults())
    defaults.update(sag_defaults())
    defaults.update(classifier_path="", classifier_scale=1.0)
    parser = new_parser(__doc__.strip().splitlines()[0])
    add_dict_to_argparser(parser, defaults)
    return parser


if __name__ == "__main__":
    run_main(main)
