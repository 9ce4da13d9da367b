import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import REPO_ROOT


@pytest.mark.slow
def test_wheel_holds_only_the_dinodpmm_package(tmp_path):
    # Build from a copy: setuptools reuses a build/ folder in the source tree, which would
    # put files deleted since an earlier build into the wheel.
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), "-q"],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("dinodpmm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"dinodpmm", wheel.name.split("-py")[0] + ".dist-info"}
    for subpackage in ("models", "inference", "features", "experiments"):
        assert f"dinodpmm/{subpackage}/__init__.py" in names
    assert not any(name.startswith("dinodpmm/tests/") for name in names)
    for config in ("lgg_flair", "magnetic_tile", "brats2021", "resc", "liver"):
        assert f"dinodpmm/experiments/configs/{config}.yaml" in names, config

    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    script = "import dinodpmm.models, dinodpmm.inference; print(dinodpmm.models.__file__)"
    result = subprocess.run(
        [sys.executable, "-c", script], env={"PYTHONPATH": str(tmp_path / "site")},
        cwd=tmp_path, check=True, capture_output=True, text=True,
    )
    assert result.stdout.startswith(str(tmp_path / "site"))


def test_editable_install_resolves_to_the_repository():
    import json
    from importlib.metadata import distributions

    import dinodpmm.models

    # A build in the repository leaves a dinodpmm.egg-info there, so look at every record.
    records = [json.loads(d.read_text("direct_url.json") or "{}") for d in distributions(name="dinodpmm")]
    if not any(record.get("dir_info", {}).get("editable") for record in records):
        pytest.skip("dinodpmm is not installed in editable mode")

    assert dinodpmm.models.__file__.startswith(str(REPO_ROOT))
