"""Point `data.<study>` in params.yaml at local copies of the datasets, for offline machines.

    python -m stages.use_local ../shared/datasets

Sets source, path (absolute, so `dvc exp` temp copies find it) and the known sha256 of
each copy present in the folder, and subdir null (the copies hold train/ at the top);
studies without a copy are left as they are.  It edits
params.yaml in place (comments kept), so the switch is visible in `git diff`, never silent.
"""
import sys
from pathlib import Path

from ruamel.yaml import YAML

from stages import paths
from stages.errors import PipelineError, stage_main

# study -> (file in the datasets folder, source, sha256 published in that folder's README)
LOCAL_COPIES = {
    "mnist": ("mnist.npz", "npz", "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64"),
    "cifar10": ("cifar10-jpeg.zip", "imagefolder", "907df706baa630e728c0dd0cf95d93045f34c1fdefda3fc050bc72d50b21c7ec"),
    "avp": ("alien-vs-predator.zip", "imagefolder", "9c17d48e6c64f1e934060685f5197ce41f7d1f09c93c175e0f9b8674937ff803"),
}


@stage_main
def main(folder: str, params_file: Path = paths.PARAMS) -> None:
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise PipelineError(f"{folder}: not a directory")
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096  # keep each line as written
    yaml.representer.add_representer(type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    document = yaml.load(params_file)
    changed = []
    for study, section in document["data"].items():
        if study not in LOCAL_COPIES or not (root / LOCAL_COPIES[study][0]).exists():
            continue
        name, source, checksum = LOCAL_COPIES[study]
        section["source"], section["path"], section["sha256"] = source, str(root / name), checksum
        if "subdir" in section:
            section["subdir"] = None
        changed.append(f"{study} <- {root / name} ({source})")
    if not changed:
        raise PipelineError(f"{folder}: none of {', '.join(v[0] for v in LOCAL_COPIES.values())} found")
    yaml.dump(document, params_file)
    print("\n".join(changed))


if __name__ == "__main__":
    main(sys.argv[1])
