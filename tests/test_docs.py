"""The way in: a short README with the two commands first, and a documentation
site that builds offline with no broken link or missing picture."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_readme_is_a_front_door_that_starts_with_the_two_commands():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    first_block = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert len(first_block) == 2 and first_block[1] == "bash .ci/run"
    assert "imageorigin predict" in first_block[0]
    # every kind of user finds a section
    for heading in ("## Checking an image", "## Moderation teams", "## Teachers and students",
                    "## ML engineers", "## How well it does", "## Documentation"):
        assert heading in text


def test_the_documentation_site_builds_strictly_offline(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                         cwd=REPO, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    home = (site / "index.html").read_text()
    assert "Evidence, not proof" in home
    # the pictures a person would rather look at than read are there
    for picture in ("guide/page-verdict.png", "guide/heatmap.png", "evaluation/native/reliability.png"):
        assert (site / picture).stat().st_size > 10_000, picture
    # each part of the guide is a page
    for page in ("guide/predict", "guide/service", "guide/scanning", "guide/training", "model/default-model",
                 "measurements/speed", "research-log"):
        assert (site / page / "index.html").is_file(), page
