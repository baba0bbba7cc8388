"""docs/results.md stays in step with the commands and files it cites (issue 23). Cheap: no
training, no evaluation.

* every ``--flag`` of every command block exists in the script it runs;
* sections 1a and 5 quote their numbers as ``[x]{.printed}``, each of which is in the stored
  output of their commands (``experiments/seed_replicates/output.txt``,
  ``experiments/ss_vae/output.txt`` and Pyro's example's output beside it), and those
  commands are the ones the page shows;
* the published model files have the sha256 the stored output and the page give.
"""

from __future__ import annotations

import hashlib
import re

from conftest import PROJECT_ROOT

RESULTS = PROJECT_ROOT / "docs" / "results.md"
STUDY = PROJECT_ROOT / "experiments" / "seed_replicates"
QUOTED = re.compile(r"\[([^\[\]]+)\]\{\.printed\}")


def commands() -> list[str]:
    """The shell commands of the page's bash blocks, continuation lines joined."""
    text = RESULTS.read_text()
    found = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        found += [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return found


def test_every_flag_of_every_command_exists_in_its_script():
    checked = 0
    for command in commands():
        script = re.search(r"python (experiments/\w+\.py)", command)
        assert script, command
        source = (PROJECT_ROOT / script.group(1)).read_text()
        for flag in re.findall(r"(?<=\s)--[\w-]+", command):
            assert f'"{flag}"' in source, f"{script.group(1)} has no option {flag}"
            checked += 1
    assert checked >= 20


def test_section_1a_quotes_only_what_its_command_printed():
    text = RESULTS.read_text()
    section = text[text.index("## 1a.") : text.index("## 1b.")]
    stored = (STUDY / "output.txt").read_text()
    quoted = QUOTED.findall(section)
    assert len(quoted) >= 20, quoted
    for value in quoted:
        assert re.search(rf"(?<![\w.]){re.escape(value)}(?![\w]|\.\d)", stored), value
    assert "experiments/seed_replicates.py" in section
    assert "(no printed command)" not in section  # every number here has its command


def test_section_5_quotes_only_what_its_commands_printed():
    text = RESULTS.read_text()
    section = text[text.index("## 5.") :]
    folder = PROJECT_ROOT / "experiments" / "ss_vae"
    stored = "\n".join(
        (folder / name).read_text() for name in ("output.txt", "pyro_example_output.txt")
    )
    quoted = QUOTED.findall(section)
    assert len(quoted) >= 40, quoted
    for value in quoted:
        assert re.search(rf"(?<![\w.]){re.escape(value)}(?![\w]|\.\d)", stored), value
    shown = {" ".join(command.split()) for command in commands()}
    ran = re.findall(r"^\$ (.*)$", (folder / "output.txt").read_text(), re.M)
    assert len(ran) == 4 and all(" ".join(command.split()) in shown for command in ran), ran


def test_the_published_model_files_have_their_checksums():
    stored = (STUDY / "output.txt").read_text()
    line = r"^(\w+_seed\d+\.pt): [\d.]+ MB, sha256 ([0-9a-f]{64})$"
    listed = dict(re.findall(line, stored, re.M))
    assert len(listed) == 6
    page = RESULTS.read_text()
    for name, digest in listed.items():
        path = STUDY / name
        assert path.stat().st_size < 2_000_000
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, name
        assert digest in page, f"results.md does not give the sha256 of {name}"
