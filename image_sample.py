"""
Entry point kept at the top level so the seed's commands work as written
(`mpiexec -n 8 python image_sample.py ...`); the script itself is scripts/image_sample.py.
"""

if __name__ == "__main__":
    from improved_diffusion import cli
    from scripts import image_sample

    cli.run_main(image_sample.main)
