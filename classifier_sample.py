"""
Entry point kept at the top level so the seed's commands work as written
(`mpiexec -n 8 python classifier_sample.py ...`); the script itself is scripts/classifier_sample.py.
"""

if __name__ == "__main__":
    from improved_diffusion import cli
    from scripts import classifier_sample

    cli.run_main(classifier_sample.main)
