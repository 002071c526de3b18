"""Determinism, resuming a killed run, Optuna searches and Hydra launchers, through the real configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger

from tests.conftest import CONF
from tests.contract import small_run, train_run
from training.datamodule import Batch, EpochBatches, ReceiptsDataModule, TrainingWindows
from training.module import NextItemModule
from training.sweep_report import write_report
from training.train import instantiate_all

ROOT = CONF.parent
TINY = ["data.receipts.config.num_shoppers=600", "data.receipts.config.num_products=300", "logger=csv"]
# values of metrics.json that are not results: wall time and where the run wrote its checkpoint
NOT_RESULTS = {"fit_seconds", "best_checkpoint", "ranker/seconds"}  # timings and paths
ONE_THREAD = os.environ | {"OMP_NUM_THREADS": "1"}  # as the tests' own process (conftest.py)


def results(path: Path) -> dict:
    metrics = json.loads((path / "metrics.json").read_text())
    return {key: value for key, value in metrics.items() if key not in NOT_RESULTS}


def test_batches_are_a_function_of_seed_and_epoch() -> None:
    def batches(epoch: int, seed: int = 0, done: int = 0) -> list[list[int]]:
        sampler = EpochBatches(103, 10, drop_last=True, seed=seed, position=lambda: (epoch, done))
        return [indices.tolist() for _, _, indices in sampler]

    assert batches(0) == batches(0) and batches(0) != batches(1) and batches(0) != batches(0, seed=1)
    assert len(batches(0)) == 10 and len({i for b in batches(0) for i in b}) == 100
    assert batches(1, done=4) == batches(1)[4:]  # a resumed epoch continues where it stopped
    assert batches(1, done=10) == batches(2)  # resumed at the end of an epoch: the next one
    windows = TrainingWindows([(i, i + 1) for i in range(103)])
    key = next(iter(EpochBatches(103, 10, drop_last=False, seed=0)))
    assert windows.__getitems__(key) == Batch(0, 0, [(i, i + 1) for i in key[2].tolist()])


def test_processes_train_disjoint_batches_of_one_epoch_order() -> None:
    """Two processes split the epoch's batches between them, each as long as the other (DDP steps in
    lockstep), and a resumed process continues with its own share."""

    def batches(rank: int, done: int = 0) -> list[list[int]]:
        sampler = EpochBatches(103, 10, True, seed=0, position=lambda: (3, done), rank=rank, world=2)
        return [indices.tolist() for _, _, indices in sampler]

    whole = [indices.tolist() for _, _, indices in EpochBatches(103, 10, True, 0, lambda: (3, 0))]
    assert batches(0) == whole[0::2] and batches(1) == whole[1::2]
    assert len(batches(0)) == len(batches(1)) == 5 and batches(1, done=2) == batches(1)[2:]
    with pytest.raises(ValueError, match="rank 2"):
        EpochBatches(103, 10, True, 0, rank=2, world=2)


def test_each_process_evaluates_its_own_shoppers_and_no_sampler_is_injected(
    compose_config: Callable[..., DictConfig],
) -> None:
    datamodule = hydra.utils.instantiate(compose_config("train", small_run("sasrec", 3e-3)).data)
    datamodule.setup("fit")
    shoppers = datamodule.histories("val").num_shoppers
    connector = SimpleNamespace(use_distributed_sampler=False)
    datamodule.trainer = SimpleNamespace(world_size=2, global_rank=1, _accelerator_connector=connector)
    positions = torch.cat([batch[0] for batch in datamodule.val_dataloader()])
    assert positions.tolist() == list(range(1, shoppers, 2))
    connector.use_distributed_sampler = True
    with pytest.raises(ValueError, match="use_distributed_sampler=false"):
        datamodule.val_dataloader()


@pytest.mark.slow  # multi-process, 40-50 s on the 2-core box: `make test-all` runs it
def test_ddp_metrics_equal_one_process_on_the_same_model(tmp_path: Path) -> None:
    """Training, validation, the scorer's fit and the test through ``trainer=ddp`` with 2 CPU processes
    (gloo) give the single-process figures exactly. At lr=0 both runs keep the seed's initial weights, so
    a difference could only come from how the evaluated shoppers are split across the processes and
    gathered back (an odd count: the shares differ in size)."""
    args = [a for a in small_run("sasrec", 0.0, "trainer.max_epochs=1") if a != "trainer=cpu"]
    single = train_run(tmp_path / "single", ["trainer=cpu", *args])
    run_dir = tmp_path / "ddp"
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
    command = [sys.executable, "-m", "training.train", *ddp, *args, f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    distributed = json.loads((run_dir / "metrics.json").read_text())
    assert distributed["processes"] == 2 and single.metrics["processes"] == 1
    figures = {key for key in single.metrics if key.startswith(("val/", "test/"))}
    assert "test/repeat_aware/ndcg@10" in figures and "val/ndcg@10" in figures
    assert {key: distributed[key] for key in figures} == {key: single.metrics[key] for key in figures}


def test_ddp_in_a_local_multirun_is_refused_before_training(tmp_path: Path) -> None:
    args = [a for a in small_run("sasrec", 3e-3, "trainer.max_epochs=1") if a != "trainer=cpu"]
    command = [sys.executable, "-m", "training.train", "-m", "trainer=ddp", "trainer.accelerator=cpu",
               "trainer.devices=2", *args, "seed=0,1", f"hydra.sweep.dir={tmp_path}"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "trainer=ddp in a local multirun (-m) is not supported" in done.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("search", [True, False])
def test_wandb_runs_carry_their_overrides_and_the_multirun_as_group(search: bool, tmp_path: Path) -> None:
    overrides = ["logger=default", "model.lr=0.002", f"paths.output_dir={tmp_path}"]
    if search:
        overrides += ["hparams_search=sasrec"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    # as in a job of the multirun (an Optuna search, or the sweep dir's name for a plain -m)
    cfg.hydra.mode, cfg.hydra.sweep.dir = "MULTIRUN", str(tmp_path / "my-sweep")
    HydraConfig.instance().set_config(cfg)
    try:
        (wandb,) = [logger for logger in instantiate_all(cfg.logger) if isinstance(logger, WandbLogger)]
    finally:
        HydraConfig.instance().cfg = None
    assert wandb._wandb_init["group"] == ("sasrec" if search else "my-sweep")
    assert "model.lr=0.002" in wandb._wandb_init["config"]["overrides"]
    assert wandb._offline  # offline unless asked (conf/logger/wandb.yaml)


def test_same_seed_and_config_give_identical_metrics(tmp_path: Path) -> None:
    """Two runs through the real configs on CPU, with every source of randomness in play (dropout,
    sampled negatives, batch order, basket shuffles, two epochs), agree exactly, on two intra-op threads:
    at these sizes (the demo's dim, batch and negatives) they differ without the CPU trainer's
    ``deterministic: true``."""
    overrides = small_run("sasrec", 3e-3, "trainer.max_epochs=2", "+trainer.limit_train_batches=8",
                          "model.loss=sampled_softmax", "model.num_negatives=1024", "model.net.dim=64",
                          "data.batch_size=256")  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first, second = (train_run(tmp_path / name, overrides) for name in ("a", "b"))
    finally:
        torch.set_num_threads(threads)
    assert results(first.path) == results(second.path)
    assert first.metrics["epochs"] == 2 and 0 < first.metrics["test/repeat_aware/recall@10"] <= 1


@pytest.mark.slow  # multi-process, 40-50 s on the 2-core box: `make test-all` runs it
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    """SIGKILL mid-epoch once checkpoints/last.ckpt holds a step, then ckpt_path=last in the same run
    dir: optimizer, scheduler, loop counters, batch order and random state resume, and the final metrics
    equal an uninterrupted run's exactly (CPU)."""
    args = small_run(
        "sasrec", 3e-3, "trainer.max_epochs=2", "callbacks.model_checkpoint.every_n_train_steps=3"
    )
    env = ONE_THREAD

    def command(run_dir: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "training.train", *args, f"hydra.run.dir={run_dir}", *extra]

    whole = train_run(tmp_path / "whole", args)  # in this process (one torch thread, as the others have)

    cut = tmp_path / "cut"
    last = cut / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(
        command(cut), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    step, deadline = 0, time.monotonic() + 120
    while step == 0 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
        if last.exists():
            step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert step > 0 and not (cut / "metrics.json").exists()

    resumed = subprocess.run(
        command(cut, "ckpt_path=last"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Restoring states from the checkpoint path at {last}" in resumed.stderr
    assert results(cut) == results(whole.path)


def test_resume_without_a_last_checkpoint_trains_from_scratch(
    compose_config: Callable[..., DictConfig],
) -> None:
    cfg = compose_config("train", ["ckpt_path=last", *small_run("gru4rec", 3e-3, "trainer.max_epochs=1"),
                                   "test=false"])  # fmt: skip
    from training.train import train

    assert 0 < train(cfg) <= 1


def test_an_optuna_search_leaves_its_study_best_experiment_csv_and_png(tmp_path: Path) -> None:
    sweep = tmp_path / "search"
    command = [
        sys.executable, "-m", "training.train", "-m", "hparams_search=sasrec", "experiment=synthetic_sasrec",
        *TINY, "trainer.max_epochs=1", "+trainer.limit_train_batches=3", "trainer.enable_progress_bar=false",
        "test=false", "hydra.sweeper.n_trials=3", "model.num_negatives=64", "model.net.num_layers=1",
        "model.net.dim=choice(16, 32)",
        f"hydra.sweep.dir={sweep}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "raised" not in done.stderr, done.stderr[-3000:]  # Hydra only warns when a callback fails

    import optuna

    study = optuna.load_study(study_name="sasrec", storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert len(study.trials) == 3 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert {"model.lr", "model.net.dim", "model.loss", "data.batch_size"} <= set(study.best_params)
    assert "model.num_negatives" not in study.best_params  # fixed on the command line
    lines = (sweep / "trials.csv").read_text().splitlines()
    assert len(lines) == 4 and "params_model.lr" in lines[0]
    png = (sweep / "search.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000

    # the best trial as an experiment: it composes back, carries the best parameters, and instantiates
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train", [f"hydra.searchpath=[file://{sweep / 'conf'}]", "experiment=best", "paths.output_dir=x"]
        )
    for key, value in study.best_params.items():
        assert OmegaConf.select(cfg, key) == value, key
    assert cfg.data.receipts.config.num_shoppers == 600 and cfg.model.num_negatives == 64
    datamodule = hydra.utils.instantiate(cfg.data)
    assert isinstance(datamodule, ReceiptsDataModule)
    vocab = {"product_ids": list(range(100, 130)), "popularity": list(range(30, 0, -1))}
    net = OmegaConf.to_container(cfg.model.net, resolve=True) | {"num_items": 32}
    module = hydra.utils.instantiate(cfg.model, net=net, vocab=vocab, _recursive_=False, _convert_="all")
    assert isinstance(module, NextItemModule) and module.hparams.lr == study.best_params["model.lr"]

    # the report can be rewritten from the study on disk alone
    (sweep / "search.png").unlink()
    write_report(sweep)
    assert (sweep / "search.png").stat().st_size > 20_000


@pytest.mark.parametrize("family", ["sasrec", "gru4rec", "bert4rec", "two_tower"])
def test_every_search_space_composes(family: str, tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", [f"hparams_search={family}"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper.study_name == family and sweeper.direction == "maximize"
    assert sweeper.storage == f"sqlite:///{cfg.hydra.sweep.dir}/optuna.db"
    assert cfg.hydra.runtime.choices.model == family
    for key in sweeper.params:  # every searched key exists in the composed config
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key


def test_a_multirun_through_the_local_launcher_runs_every_job(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "training.train", "-m", "hydra/launcher=local", "experiment=synthetic_sasrec",
        "model.lr=1e-3,3e-3", *TINY, "trainer.max_epochs=1", "+trainer.limit_train_batches=3", "test=false",
        "trainer.enable_progress_bar=false", f"hydra.sweep.dir={tmp_path}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in done.stdout + done.stderr
    assert len(list((tmp_path / ".submitit").glob("*/*_result.pkl"))) == 2  # each ran as its own job
    overrides = [(tmp_path / str(j) / ".hydra" / "overrides.yaml").read_text() for j in (0, 1)]
    assert "model.lr=0.001" in overrides[0] and "model.lr=0.003" in overrides[1]
    scores = [json.loads((tmp_path / str(j) / "metrics.json").read_text())["val/ndcg@10"] for j in (0, 1)]
    assert all(0 < s <= 1 for s in scores) and scores[0] != scores[1]


@pytest.mark.parametrize("launcher", ["local", "slurm"])
def test_launchers_compose_for_training_and_the_batch_job(launcher: str) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for name, extra in (("train", []), ("candidates", ["receipts=r", "output=o", "bundle=b"])):
            cfg = compose(name, [f"hydra/launcher={launcher}", *extra], return_hydra_config=True)
            target = cfg.hydra.launcher._target_
            assert target.endswith("LocalLauncher" if launcher == "local" else "SlurmLauncher"), target
            if launcher == "slurm":
                assert cfg.hydra.launcher.max_num_timeout > 0 and cfg.hydra.launcher.gpus_per_node == 1


def test_slurm_trainer_requeues_automatically(compose_config: Callable[..., DictConfig]) -> None:
    from lightning_fabric.plugins.environments import SLURMEnvironment

    cfg = compose_config("train", ["trainer=slurm", "trainer.accelerator=cpu", "trainer.precision=32-true"])
    plugins = [hydra.utils.instantiate(p) for p in cfg.trainer.plugins]
    (environment,) = [p for p in plugins if isinstance(p, SLURMEnvironment)]
    assert environment.auto_requeue and environment.requeue_signal == signal.SIGUSR1
    assert any(type(p).__name__ == "AtomicCheckpointIO" for p in plugins)
