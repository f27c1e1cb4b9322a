"""Write the per-file sha256 manifest of an ImageFolder dataset (for `data.<study>.manifest`).

    python -m tools.manifest ../shared/datasets/alien-vs-predator.zip manifests/avp.sha256 [SUBDIR]

Reads the dataset exactly as the download stage does (directory, zip, tar or URL), so the
manifest lists the files the pipeline uses, by path from the split root, in `sha256sum`
format (`cd <split root> && sha256sum -c <manifest>` checks an extracted copy).
"""
import sys
from pathlib import Path

from imgcls.errors import stage_main
from imgcls.files import local_copy, save_text
from imgcls.sources import from_imagefolder, manifest_lines


@stage_main
def main(location: str, target: str, subdir: str | None = None) -> None:
    with local_copy(location, None, location) as path:
        dataset = from_imagefolder(path, subdir)
    lines = manifest_lines(dataset)
    save_text(Path(target), "\n".join(lines) + "\n")
    print(f"{target}: {len(lines)} files")


if __name__ == "__main__":
    main(*sys.argv[1:])
