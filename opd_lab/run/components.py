"""Building a run: its directory, seeds, task, tokenizer and token ids, models, rollout engine and teacher scorer.

The jobs (``python -m opd_lab``, ``python -m opd_lab.evaluate``, ``python -m opd_lab.diagnose``) are built from
these pieces; every check that needs the tokenizer or the task runs here, before any model weights load.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from opd_lab.common import console
from opd_lab.common.distributed import Dist
from opd_lab.config import Backend, Config, ConfigError, TeacherScorer, TeacherSpec, check_vllm_lengths, teacher_scorers
from opd_lab.core.gates import GROUPINGS, REDUCERS
from opd_lab.core.losses import LOSSES
from opd_lab.learner import checkpoint
from opd_lab.learner.scoring import SCORERS
from opd_lab.learner.teachers import RULES
from opd_lab.models.loading import ModelPaths, check_same_vocab, load_model, load_tokenizer, loading, resolve_paths
from opd_lab.models.token_ids import TokenIds
from opd_lab.rollout.base import ENGINES, TRAITS, BuildContext
from opd_lab.run.directory import write_status
from opd_lab.tasks import TASKS, Task, build_task, prompt_encoder


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_registered(run: Config) -> None:
    """Every name that a registry resolves (``loss.name``, ``gate.kind``, ``gate.reduce``, ``routing.rule``,
    ``task.name``) is registered, built-in or by a plugin: a typo fails here, naming the field and the names."""
    for path, value, registry in (("loss.name", run.loss.name, LOSSES), ("gate.kind", run.gate.kind, GROUPINGS),
                                  ("gate.reduce", run.gate.reduce, REDUCERS),
                                  ("routing.rule", run.routing.rule, RULES), ("task.name", run.task.name, TASKS)):
        names = registry.names() + (["single"] if registry is RULES else [])  # single: one teacher, no rule
        if value not in names:
            raise ConfigError(f"{path}={value!r} is invalid: allowed one of {sorted(names)} (built in, or "
                              f"registered by a module of plugins={list(run.plugins)}; docs/extending.md)")


def check_launch(cfg: Config, dist: Dist, in_multirun: bool) -> None:
    """What torchrun cannot run: an uneven prompt split, an evaluation-only run, vLLM in a torchrun multirun."""
    if not dist.enabled:
        return
    if cfg.rollout.n_prompts % dist.world:
        raise ConfigError(f"rollout.n_prompts={cfg.rollout.n_prompts} is invalid with {dist.world} ranks: allowed "
                          "a multiple of the number of ranks (each rank rolls out an equal share)")
    if cfg.eval.only is not None:
        raise ConfigError("eval.only is set: an evaluation-only run uses one process (run it without torchrun)")
    if cfg.routing.rule == "alignment" and len(cfg.model.teachers) > 1:
        raise ConfigError("routing.rule=alignment under torchrun: the alignment probe runs in one process; use "
                          "another routing rule with torchrun")
    if "vllm" in (cfg.rollout.engine.value, *(sc.value for _, sc in teacher_scorers(cfg))) and in_multirun:
        raise ConfigError("rollout.engine/teacher_scorer=vllm with --multirun under torchrun: a second vLLM "
                          "engine in the same torchrun processes hangs; sweep with hydra/launcher=slurm_multigpu "
                          "(one job per grid point) or one torchrun per job, or use rollout.engine=hf")


def open_run_dir(cfg: Config, run_dir: Path, dist: Dist) -> tuple[Path, Path | None, dict | None]:
    """``(run_dir, resume_dir, finished)``: the directory this run writes to (rank 0's choice, broadcast: ranks may
    differ in ``${now:}``), the run it resumes (``trainer.resume``) and, when that run already completed, its
    final status (nothing to do). Otherwise the directory is started: ``config.yaml`` and a running status."""
    resume_dir = checkpoint.find_run_to_resume(cfg, run_dir) if cfg.eval.only is None and dist.is_main else None
    run_dir, resume_dir = dist.broadcast((run_dir, resume_dir))
    if resume_dir is not None:
        if resume_dir != run_dir and dist.is_main:
            print(f"opd-lab: trainer.resume={cfg.trainer.resume}: continuing {resume_dir}", flush=True)
        run_dir = resume_dir
        status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").exists() else {}
        if status.get("status") == "completed":
            print(f"opd-lab: {run_dir} already completed; nothing to resume", flush=True)
            return run_dir, resume_dir, status
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        write_status(run_dir, "running", pid=os.getpid(), world=dist.world)
    return run_dir, resume_dir, None


@dataclass
class Setup:
    """What every job needs before any weights load."""

    task: Task
    paths: ModelPaths
    tokenizer: object
    tokens: TokenIds


def prepare(cfg: Config, dist: Dist) -> Setup:
    """Threads and seeds, the task, the model paths (rank 0 builds the embedded pair first), the tokenizer and its
    checks (one vocabulary, the loss's checks, the special tokens, prompt lengths): every start-up error that
    needs the tokenizer or the data, before any model loads."""
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    seed_everything(cfg.trainer.seed)
    task = build_task(cfg.task)
    if dist.is_main:
        paths = resolve_paths(cfg)
    dist.barrier()
    if not dist.is_main:
        paths = resolve_paths(cfg)
    with loading("model.tokenizer" if cfg.model.tokenizer else "model.student", paths.tokenizer):
        tokenizer = load_tokenizer(paths.tokenizer, cfg.model.chat_template)
    with loading("model.teacher", paths.teacher):
        check_same_vocab(tokenizer, load_tokenizer(paths.teacher, cfg.model.chat_template))
    for name, path in paths.teachers.items() if cfg.model.teachers else ():
        field_name = f"model.teachers.{name}.model"
        with loading(field_name, path):
            check_same_vocab(tokenizer, load_tokenizer(path, cfg.model.chat_template), field_name)
    LOSSES.get(cfg.loss.name).check(cfg.loss, len(tokenizer))
    check_routing_tags(cfg, task)
    tokens = TokenIds.build(tokenizer, list(cfg.model.special_tokens), paths.student)
    training = cfg.eval.only is None
    if hasattr(task, "load_train") and training:
        task.load_train()  # a bad training-set path fails here, before any model loads
    check_prompt_lengths(cfg, tokenizer, task, training=training)
    return Setup(task, paths, tokenizer, tokens)


def check_routing_tags(cfg: Config, task) -> None:
    """``routing=per_sample`` on a task that knows its tags (``task.tags()``: the embedded task's ``ops<n>``): every
    ``routing.by_tag`` key is one of them, and without ``routing.default`` every tag has a teacher."""
    if cfg.routing.rule != "per_sample" or not hasattr(task, "tags"):
        return
    tags = task.tags()
    for tag in cfg.routing.by_tag:
        if tag not in tags:
            raise ConfigError(f"routing.by_tag.{tag} is invalid: the task has no problems tagged {tag!r}; its tags are "
                              f"{', '.join(tags)}")
    missing = [t for t in tags if t not in cfg.routing.by_tag]
    if missing and cfg.routing.default is None:
        raise ConfigError(f"routing.by_tag has no teacher for the tags {', '.join(missing)} and routing.default is "
                          "null: map them or set routing.default")


def check_prompt_lengths(cfg: Config, tokenizer, task, training: bool = True, n_longest: int = 64) -> None:
    """With a vLLM engine, prompt + response must fit ``rollout.vllm.max_model_len`` (vLLM would cap the
    response silently): checked on every evaluation prompt and (``training``) the longest training prompts by
    characters; the engine checks every prompt again when it samples."""
    if "vllm" not in (cfg.rollout.engine.value, *(sc.value for _, sc in teacher_scorers(cfg))):
        return
    encode = prompt_encoder(cfg)
    limit = cfg.rollout.vllm.max_model_len
    checks = [("eval.max_tokens", cfg.eval.max_tokens, task.eval_problems())]
    if training:
        train = task.train_pool() if hasattr(task, "train_pool") else task.train_problems(256, random.Random(0))
        checks.append(("rollout.max_tokens", cfg.rollout.max_tokens,
                       sorted(train, key=lambda p: len(p.prompt or p.question), reverse=True)[:n_longest]))
    for field_name, cap, problems in checks:
        longest = max((len(p) for p in encode(tokenizer, problems)), default=0)
        if longest + cap > limit:
            raise ConfigError(f"{field_name}={cap} is invalid: the longest prompt has {longest} tokens and "
                              f"rollout.vllm.max_model_len={limit}: allowed {field_name} <= {limit - longest} (or "
                              "raise rollout.vllm.max_model_len)")


def engine_evaluates_in_memory(cfg: Config) -> bool:
    """Whether the engine samples a loaded module, so that the teacher's baseline evaluation needs it loaded."""
    return TRAITS.get(cfg.rollout.engine.value).in_memory


def load_models(cfg: Config, paths: ModelPaths, device: str) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The trainable student on ``device`` and, when an HF forward needs it (the HF teacher scorer, or the HF
    engine evaluating the teacher's baseline), the frozen teacher on ``rollout.teacher_device`` or ``device`` (None
    with ``model.teachers``: :func:`load_teachers` loads those); ``trainer.compile``: the student with a compiled body
    (:func:`~opd_lab.learner.heads.compile_body`)."""
    with loading("model.student", paths.student):
        student = load_model(paths.student, cfg.model.dtype, device, trainable=True)
    teacher = None
    if not cfg.model.teachers and (cfg.rollout.teacher_scorer.value == "hf" or engine_evaluates_in_memory(cfg)):
        with loading("model.teacher", paths.teacher):
            teacher = load_model(paths.teacher, cfg.model.dtype, cfg.rollout.teacher_device or device,
                                 trainable=False)
    if cfg.trainer.compile:
        from opd_lab.learner.heads import compile_body

        student = compile_body(student)
    return student, teacher


def resolve_engine(cfg: Config) -> str | None:
    """``rollout.engine=auto`` → the fastest engine that fits the device and the student, set in place before
    anything is written or loaded (the run directory's config, checkpoints and the evaluation cache name the
    engine that ran): vLLM on CUDA when it is installed; else the static engine for a plain Qwen3 student (the
    embedded pair always is; another is read from its ``config.json``); else HF ``generate``. Returns the line
    that says what was chosen and why (``None`` when the engine was named)."""
    if cfg.rollout.engine != Backend.auto:
        return None
    import importlib.util

    from opd_lab.rollout.static import check_supported

    device = "CUDA" if cfg.trainer.device.startswith("cuda") else "CPU"
    if device == "CUDA" and importlib.util.find_spec("vllm") is not None:
        chosen, why = Backend.vllm, "CUDA with vLLM installed"
    else:
        try:
            if cfg.model.student != "embedded":
                from transformers import AutoConfig

                check_supported(AutoConfig.from_pretrained(cfg.model.student))
            chosen, why = Backend.static, f"{device}, a plain Qwen3 student"
        except Exception as e:  # not a plain Qwen3, or a config that cannot be read here
            chosen, why = Backend.hf, f"{device}; the static engine does not serve this student ({e})"
    cfg.rollout.engine = chosen
    check_vllm_lengths(cfg)
    return f"rollout.engine=auto → {chosen.value} ({why}; name another with rollout.engine=vllm|static|hf)"


def make_engine(cfg: Config, model, tokenizer, path: str, stop_ids: tuple[int, ...], sharded_root=None):
    """The configured rollout engine (``rollout.engine``; ``auto`` resolved by :func:`resolve_engine`) over
    ``model`` (HF; ``sharded_root``: its FSDP2 root) or the weights at ``path`` (vLLM), stopping at ``stop_ids``
    (tokens.stop_token_ids)."""
    resolve_engine(cfg)
    ctx = BuildContext(cfg, tokenizer, path, stop_ids, model=model, sharded_root=sharded_root)
    with console.native_stderr_to_log():
        return ENGINES.get(cfg.rollout.engine.value)(ctx)


def make_teacher_scorer(cfg: Config, teacher, tokenizer, path: str):
    """The configured teacher placement (``rollout.teacher_scorer``): an HF forward of the loaded teacher, in-process
    vLLM prompt log-probs over the weights at ``path``, or a vLLM server."""
    ctx = BuildContext(cfg, tokenizer, path, (), model=teacher)
    with console.native_stderr_to_log():
        return SCORERS.get(cfg.rollout.teacher_scorer.value)(ctx)


# ------------------------------------------------------------------------------------------------- teachers
@dataclass
class LoadedTeachers:
    """The training teachers before their scorers exist: names, folders or hub ids, HF modules (None where no HF
    forward needs one), devices, and whether they are scored one at a time (``routing.residency``)."""

    names: list[str]
    paths: list[str]
    models: list[torch.nn.Module | None]
    devices: list[str]
    weights: list[float]
    one_at_a_time: bool = False


def teacher_config(cfg: Config, spec: TeacherSpec) -> Config:
    """The run's config as one teacher of ``model.teachers`` sees it: its own scorer, device and server URL in
    place of the ``rollout.teacher_*`` settings (what the scorer builders read)."""
    r = cfg.rollout
    return replace(cfg, rollout=replace(
        r, teacher_scorer=TeacherScorer(spec.scorer) if spec.scorer else r.teacher_scorer,
        teacher_device=spec.device or r.teacher_device,
        teacher_server=replace(r.teacher_server, url=spec.server_url or r.teacher_server.url)))


def load_teachers(cfg: Config, paths: ModelPaths, teacher, device: str) -> LoadedTeachers:
    """The training teachers: ``model.teacher`` (the loaded ``teacher``, exactly as before) or every entry of
    ``model.teachers``, each HF module loaded on the CPU and moved to its device unless they do not fit there
    together (``routing.residency``: auto | all | one)."""
    if not cfg.model.teachers:
        dev = cfg.rollout.teacher_device or device
        return LoadedTeachers(["teacher"], [paths.teacher], [teacher], [dev], [1.0])
    residency = cfg.routing.residency.value
    names, models, devices = list(cfg.model.teachers), [], []
    for name, spec in cfg.model.teachers.items():
        tcfg = teacher_config(cfg, spec)
        dev = tcfg.rollout.teacher_device or device
        model = None
        if tcfg.rollout.teacher_scorer.value == "hf" or engine_evaluates_in_memory(cfg):
            with loading(f"model.teachers.{name}.model", paths.teachers[name]):
                model = load_model(paths.teachers[name], cfg.model.dtype, dev if residency == "all" else "cpu",
                                   trainable=False)
        models.append(model)
        devices.append(dev)
    from opd_lab.learner.teachers import fits_together

    one = residency == "one" or (residency == "auto" and not fits_together(models, devices))
    if not one:
        for model, dev in zip(models, devices, strict=True):
            if model is not None:
                model.to(dev)
    weights = [s.weight for s in cfg.model.teachers.values()]
    return LoadedTeachers(names, [paths.teachers[n] for n in names], models, devices, weights, one)


def make_teachers(cfg: Config, tokenizer, loaded: LoadedTeachers):
    """The run's :class:`~opd_lab.learner.teachers.Teachers`: one scorer per teacher (its own placement settings)."""
    from opd_lab.learner.teachers import Teachers

    specs = list(cfg.model.teachers.values()) or [None]
    scorers = [make_teacher_scorer(teacher_config(cfg, spec) if spec else cfg, model, tokenizer, path)
               for spec, model, path in zip(specs, loaded.models, loaded.paths, strict=True)]
    return Teachers(loaded.names, scorers, cfg.routing, loaded.weights, loaded.models, loaded.devices,
                    loaded.one_at_a_time)
