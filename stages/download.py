"""Stage download@<study>: fetch the study's data from its configured source, verify it and
write the canonical raw copy (data/raw/<study>.npz).  Reads params `data.<study>`."""
import sys

from imgcls import params, paths
from imgcls.errors import stage_main
from imgcls.sources import check_dataset, read_source, save_raw


@stage_main
def main(study: str) -> None:
    cfg = params.study(params.load(), study)
    dataset = read_source(study, cfg)
    check_dataset(dataset, study)
    save_raw(dataset, paths.raw(study))
    counts = ", ".join(f"{name} {len(split)}" for name, split in dataset.splits.items())
    print(f"download@{study}: {counts} images, {len(dataset.classes)} classes -> {paths.raw(study)}")


if __name__ == "__main__":
    main(sys.argv[1])
