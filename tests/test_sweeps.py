"""Every sweep config (configs/sweep/<paper or offline>/<table>.yaml) expands into jobs that all compose and pass
the compose-time checks, and its FIRST job runs end to end under debug=fast_dev_run on the tiny stand-ins of
tests/stand_ins.py (real Fashion-MNIST for the offline sweeps)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from structured_compress.config_checks import check_config

from .conftest import CONFIG_DIR, ROOT, compose_config
from .stand_ins import marked_slow, run_with_stand_ins

SWEEP_DIR = CONFIG_DIR / "sweep"


def sweep_names() -> list[str]:
    return sorted(str(p.relative_to(SWEEP_DIR).with_suffix("")) for p in SWEEP_DIR.rglob("*.yaml"))


def sweep_jobs(name: str) -> list[list[str]]:
    """The override lists of a sweep's jobs, in the basic sweeper's order: the cartesian product of its
    ``hydra.sweeper.params`` (each value parsed by Hydra's own override grammar)."""
    params = OmegaConf.to_container(OmegaConf.load(SWEEP_DIR / f"{name}.yaml").hydra.sweeper.params)
    parser = OverridesParser.create()
    axes = []
    for key, value in params.items():
        override = parser.parse_overrides([f"{key}={value}"])[0]
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() \
            else [override.get_value_element_as_str()]
        axes.append([f"{key}={v}" for v in values])
    return [list(job) for job in itertools.product(*axes)]


def test_sweep_expansion_is_the_cartesian_product():
    jobs = sweep_jobs("ternary_svd/opt_perplexity")
    assert len(jobs) == 9 and len({tuple(j) for j in jobs}) == 9
    assert jobs[0] == ["experiment=opt/opt6.7b-tsvd-ptq", "layer.options.tolerance=0.01", "datamodule=wikitext2"]
    assert sweep_jobs("hyper/mobilenetv3_cifar10")[1][-1] == "layer.options.codebook_sizes=[400]"


@pytest.mark.parametrize("name", sweep_names())
def test_every_job_composes_and_passes_the_checks(name, stand_ins, tmp_path):
    paper = name.split("/")[0]
    compose_config([f"sweep={name}"], tmp_path)  # what `run.py -m` composes before the sweeper expands the jobs
    placeholder = tmp_path / "weights.safetensors"
    placeholder.touch()
    for job in sweep_jobs(name):
        cfg = compose_config([f"sweep={name}", *job, f"paths.data_dir={stand_ins['data']}"], tmp_path)
        if cfg.model.get("pretrained_path"):  # weights the user provides: any existing file passes the check
            cfg.model.pretrained_path = str(placeholder)
        check_config(cfg)
        assert cfg.hydra.sweep.dir.startswith(f"{cfg.paths.log_dir}/sweeps/{paper}/"), cfg.hydra.sweep.dir


@pytest.mark.parametrize("name", sweep_names())
def test_header_names_the_command(name):
    header = (SWEEP_DIR / f"{name}.yaml").read_text().split("\nhydra:")[0]
    assert f"python run.py -m sweep={name}" in header
    if not name.startswith("offline/"):
        assert f"python scripts/make_table.py logs/sweeps/{name}" in header
        assert "hydra/launcher=slurm" in header


def test_docs_list_every_sweep():
    text = (ROOT / "docs" / "sweeps.md").read_text()
    missing = [name for name in sweep_names() if f"sweep={name}" not in text]
    assert not missing, f"docs/sweeps.md does not list {missing}"


def first_jobs() -> list:
    """Every sweep name, marked slow when its first job is a slow experiment."""
    out = []
    for name in sweep_names():
        experiment = next((o.split("=", 1)[1] for o in sweep_jobs(name)[0] if o.startswith("experiment=")), "")
        out.append(marked_slow(name, experiment))
    return out


@pytest.mark.parametrize("name", first_jobs())
def test_first_job_runs_under_fast_dev_run(name, stand_ins, tmp_path):
    metrics, cfg = run_with_stand_ins([f"sweep={name}", *sweep_jobs(name)[0]], stand_ins, tmp_path)
    assert np.isfinite(metrics["metrics"][cfg.optimized_metric])
    assert metrics["params"]["replaced_layers"] > 0
