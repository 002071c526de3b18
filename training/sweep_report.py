"""The report of an Optuna search (``conf/hparams_search/``): its best trial as a ready-to-run experiment,
a CSV of every trial, and a PNG of the optimisation history and the parameter importances.

hydra-optuna-sweeper gives no hook after its study, so the report is a Hydra callback
(:class:`SweepReport`, configured in ``conf/hparams_search/base.yaml``): ``on_multirun_start`` creates the
sweep dir (the study's SQLite file lives there, and the sweeper opens it before any job runs) and
``on_multirun_end`` writes the report. It reads only the study on disk, so it can be rewritten at any time,
for a search still running or one that was stopped:

    python -m training.sweep_report multirun/search/sasrec            # the sweep dir
    python -m training.train experiment=best 'hydra.searchpath=[file://multirun/search/sasrec/conf]'

Files written to the sweep dir: ``conf/experiment/best.yaml`` (``# @package _global_``: the config groups and
values of the search's base config with the best trial's parameters), ``trials.csv`` and ``search.png``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

STUDY_FILE = "optuna.db"
EXPERIMENT = Path("conf") / "experiment" / "best.yaml"
# the config groups of conf/train.yaml an experiment sets; paths and hydra stay the run's own
GROUPS = ("data", "model", "trainer", "callbacks", "logger")
SKIPPED = {"paths", "hydra", "ckpt_path"}


def _study(sweep_dir: Path, study_name: str | None = None) -> Any:
    import optuna

    storage = f"sqlite:///{sweep_dir / STUDY_FILE}"
    if study_name is None:
        (summary,) = optuna.get_all_study_summaries(storage)  # one study per sweep dir
        study_name = summary.study_name
    return optuna.load_study(study_name=study_name, storage=storage)


def best_experiment(base: DictConfig, params: dict[str, Any], value: float, number: int) -> str:
    """A ``# @package _global_`` experiment reproducing ``base`` (a composed train config; its config group
    choices from ``hydra.runtime.choices``) with the override ``params`` of the best trial applied."""
    choices = base.hydra.runtime.choices
    values = OmegaConf.masked_copy(base, [key for key in base if key not in SKIPPED])
    for key, param in params.items():
        OmegaConf.update(values, key, param, merge=False)
    defaults = [{f"override /{group}": choices[group]} for group in GROUPS if choices.get(group)]
    experiment = OmegaConf.create({"defaults": defaults})
    for key in values:
        experiment[key] = values._get_node(key)
    body = OmegaConf.to_yaml(experiment)
    header = (
        "# @package _global_\n"
        f"# The best trial (number {number}, {base.optimized_metric} = {value:.6g}) of an Optuna search\n"
        f"# (training/sweep_report.py): {', '.join(f'{k}={v}' for k, v in params.items())}\n"
    )
    return header + body


def write_report(
    sweep_dir: str | Path, base: DictConfig | None = None, study_name: str | None = None
) -> dict:
    """Write the best trial's experiment, ``trials.csv`` and ``search.png`` into ``sweep_dir``.

    ``base`` is the search's composed config; without it, the first trial's (``<dir>/**/.hydra/config.yaml``
    and its ``hydra.yaml``) is used. Returns the paths written and the best trial's number, value and params.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.importance import MeanDecreaseImpurityImportanceEvaluator
    from optuna.visualization.matplotlib import plot_optimization_history

    sweep_dir = Path(sweep_dir)
    study = _study(sweep_dir, study_name)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise ValueError(f"the study in {sweep_dir} has no complete trial")
    best = study.best_trial
    if base is None:
        base = _first_trial_config(sweep_dir)
    written: dict[str, Any] = {
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": best.params,
    }

    experiment = sweep_dir / EXPERIMENT
    experiment.parent.mkdir(parents=True, exist_ok=True)
    experiment.write_text(best_experiment(base, best.params, best.value, best.number))
    trials = sweep_dir / "trials.csv"
    study.trials_dataframe().to_csv(trials, index=False)

    figure, (history, importance) = plt.subplots(1, 2, figsize=(13, 4.5))
    plt.close(figure)
    axis = plot_optimization_history(study)  # draws its own figure; copied onto ours
    for line in axis.get_lines():
        history.plot(*line.get_data(), color=line.get_color(), label=line.get_label())
    for collection in axis.collections:
        offsets = collection.get_offsets()
        history.scatter(offsets[:, 0], offsets[:, 1], s=16, label=collection.get_label())
    plt.close(axis.figure)
    history.set(title="optimisation history", xlabel="trial", ylabel=str(base.optimized_metric))
    history.legend(fontsize=8)
    if len(complete) > 1:
        # mean decrease in impurity: optuna 2.10's default fANOVA breaks on current scikit-learn trees
        scores = optuna.importance.get_param_importances(
            study, evaluator=MeanDecreaseImpurityImportanceEvaluator(seed=0)
        )
        names = list(scores)[::-1]
        importance.barh(names, [scores[name] for name in names])
    importance.set(title="parameter importances (mean decrease in impurity)", xlabel="importance")
    figure.tight_layout()
    png = sweep_dir / "search.png"
    figure.savefig(png, dpi=100)
    written |= {"experiment": str(experiment), "trials": str(trials), "figure": str(png)}
    log.info("search report: %s", written)
    log.info(
        "run the best trial: python -m training.train experiment=best 'hydra.searchpath=[file://%s]'",
        (sweep_dir / "conf").resolve(),
    )
    return written


def _first_trial_config(sweep_dir: Path) -> DictConfig:
    """A trial's composed config with its ``hydra`` node (from its ``.hydra/`` files)."""
    for config in sorted(sweep_dir.glob("**/.hydra/config.yaml")):
        hydra = OmegaConf.load(config.parent / "hydra.yaml")
        return OmegaConf.merge(OmegaConf.load(config), hydra)
    raise FileNotFoundError(f"no trial under {sweep_dir} has a .hydra/config.yaml")


class SweepReport(Callback):
    """Hydra callback (``hydra.callbacks``): creates the sweep dir before the sweeper opens its study there,
    and writes the report when the search ends."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_report(config.hydra.sweep.dir, config, config.hydra.sweeper.get("study_name"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help=f"the search's sweep dir (holding {STUDY_FILE})")
    parser.add_argument("--study", default=None, help="study name (default: the only one in the storage)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_report(args.sweep_dir, study_name=args.study)


if __name__ == "__main__":
    main()
