"""Config schema of CMG, DCID and COMET runs (`config.method = 'cmg'`): shared defaults, the
continual configs with the ablation switches of COMET's Table 6, and validation before anything
compiles."""

from __future__ import annotations

import ml_collections

from unialign_jax import configlib
from unialign_jax import optim
from unialign_jax.configlib import ConfigError
from unialign_jax.data import pipeline
from unialign_jax.data.pipeline import MODALITIES


def validate(config: ml_collections.ConfigDict, dataset_modalities=pipeline.dataset_modalities) -> None:
    """Checks a training config before any compilation.

    Args:
      config: the resolved config.
      dataset_modalities: data config -> the modalities that dataset provides (raises ValueError on
        an unknown dataset); the default builds nothing.

    Raises:
      ConfigError: naming the offending field.
    """
    configlib.check_run_fields(config)
    known = tuple(config.model.modalities)
    for name in known:
        if name not in MODALITIES:
            raise ConfigError(
                f"config.model.modalities: unknown modality {name!r}; known: {', '.join(MODALITIES)}."
            )
        if name not in config.model.input_shapes:
            raise ConfigError(f"config.model.input_shapes: no shape for modality {name!r}.")
    if not config.stages:
        raise ConfigError("config.stages: at least one stage is required.")
    seen: set[str] = set()
    names: set[str] = set()
    total_codes = 0
    for index, stage in enumerate(config.stages):
        where = f"config.stages[{index}]"
        if stage.name in names:
            raise ConfigError(f"{where}.name: duplicate stage name {stage.name!r}.")
        names.add(stage.name)
        stage_modalities = tuple(stage.modalities)
        if len(stage_modalities) < 2:
            raise ConfigError(
                f"{where}.modalities: a stage needs at least two modalities, got {stage_modalities}."
            )
        for name in stage_modalities:
            if name not in known:
                raise ConfigError(f"{where}.modalities: {name!r} is not in config.model.modalities {known}.")
        mediator = stage.get("mediator")
        if index > 0 and mediator:
            if mediator not in stage_modalities:
                raise ConfigError(
                    f"{where}.mediator: {mediator!r} is not one of the stage's modalities {stage_modalities}."
                )
            if mediator not in seen:
                raise ConfigError(
                    f"{where}.mediator: {mediator!r} was never seen in an earlier stage (seen: {sorted(seen)})."
                )
        if stage.get("pairs"):
            _validate_pairs(where, stage, dataset_modalities)
        else:
            _validate_data(where, stage.data, stage_modalities, dataset_modalities)
        if stage.steps <= 0:
            raise ConfigError(f"{where}.steps must be positive, got {stage.steps}.")
        if stage.codebook_rows < 0 or (index == 0 and stage.codebook_rows == 0):
            raise ConfigError(f"{where}.codebook_rows must be positive for the first stage and >= 0 after.")
        total_codes += stage.codebook_rows
        seen.update(stage_modalities)
    if total_codes > config.quantizer.codebook_capacity:
        raise ConfigError(
            f"config.quantizer.codebook_capacity={config.quantizer.codebook_capacity} is smaller than the "
            f"{total_codes} codes the stages add; raise it (growth beyond capacity reallocates, but the "
            "capacity should be planned)."
        )
    eval_data = config.eval.data
    if eval_data is not None and "name" not in eval_data:  # {modality: data config}: unpaired datasets
        if config.eval.paired and len({d.to_json(sort_keys=True) for d in eval_data.values()}) > 1:
            raise ConfigError("config.eval.paired is set but config.eval.data reads the modalities from different "
                              "datasets, whose rows are not instance pairs: set config.eval.paired=False.")
    _validate_continual(config)
    if config.batch_size % max(1, config.get("num_processes", 1)) != 0:
        raise ConfigError(f"config.batch_size={config.batch_size} must divide evenly across processes.")


def _validate_data(where: str, data: ml_collections.ConfigDict, modalities: tuple[str, ...],
                   dataset_modalities) -> None:
    try:
        available = dataset_modalities(data)
    except ValueError as error:
        raise ConfigError(f"{where}.data: {error}") from error
    missing = [m for m in modalities if m not in available]
    if missing:
        raise ConfigError(f"{where}.data: dataset {data.name!r} has no modality {missing}.")


def _validate_pairs(where: str, stage: ml_collections.ConfigDict, dataset_modalities) -> None:
    """A stage of several groups: each group a known pair (or more) in its own dataset, distinct
    leads (the mixed batch is keyed by them), `modalities` their union, and no mediator."""
    leads, union = set(), set()
    for index, pair in enumerate(stage.pairs):
        group = tuple(pair.modalities)
        if len(group) < 2:
            raise ConfigError(f"{where}.pairs[{index}].modalities: a group needs two modalities, got {group}.")
        if group[0] in leads:
            raise ConfigError(f"{where}.pairs[{index}].modalities: lead modality {group[0]!r} repeats; each "
                              "group's first modality must be its own.")
        leads.add(group[0])
        union.update(group)
        _validate_data(f"{where}.pairs[{index}]", pair.data, group, dataset_modalities)
    if union != set(stage.modalities):
        raise ConfigError(f"{where}.modalities {tuple(stage.modalities)} must be the union of its pairs "
                          f"{sorted(union)}.")
    if stage.get("mediator"):
        raise ConfigError(f"{where}.mediator: a stage of several pairs has no mediator (PMR, growth rows and "
                          "distillation read one pair).")


def _validate_continual(config: ml_collections.ConfigDict) -> None:
    continual = config.continual
    if continual.pmr_teacher not in ("live", "frozen"):
        raise ConfigError(f"config.continual.pmr_teacher must be 'live' or 'frozen', got {continual.pmr_teacher!r}.")
    if not continual.mediator_distillation >= 0:
        raise ConfigError("config.continual.mediator_distillation must be >= 0, got "
                          f"{continual.mediator_distillation!r}.")
    micro = continual.fisher_micro_batch_size
    if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1 or config.batch_size % micro:
        raise ConfigError(f"config.continual.fisher_micro_batch_size={micro!r} must be a positive integer "
                          f"dividing config.batch_size={config.batch_size}.")
    if not 0 < continual.code_owner_min_share <= 1:
        raise ConfigError("config.continual.code_owner_min_share must be in (0, 1], got "
                          f"{continual.code_owner_min_share!r}.")
    if continual.fisher_batches < 1:
        raise ConfigError(f"config.continual.fisher_batches must be >= 1, got {continual.fisher_batches}.")


# Feature shapes per modality: the CMG reference dimensions and a small CPU-friendly variant.
REFERENCE_SHAPES = {
    "video": (10, 7, 7, 512),
    "audio": (10, 128),
    "text": (10, 768),
    "image": (10, 512),
    "speech": (10, 128),
    "depth": (10, 512),
    "points": (10, 256),
}
SMALL_SHAPES = {
    "video": (10, 7, 7, 16),
    "audio": (10, 32),
    "text": (10, 48),
    "image": (10, 32),
    "speech": (10, 32),
    "depth": (10, 32),
    "points": (10, 32),
}


def resolve_data(name: str, modalities: tuple[str, ...]) -> str:
    """`name`, or 'synthetic' when the digits or numbers data lacks one of `modalities` (e.g. speech)."""
    if name not in ("synthetic", "digits", "numbers", "features"):
        raise ValueError(f"data={name!r}: choose data=digits, data=numbers, data=synthetic or data=features.")
    shapes = {"digits": configlib.digits_shapes, "numbers": configlib.numbers_shapes}.get(name)
    missing = [m for m in modalities if shapes and m not in shapes()]
    if missing:
        print(f"data={name} has no {missing}; using the synthetic world for this config.")
        return "synthetic"
    return name


def cmg_config(*, size: str, modalities: tuple[str, ...], data: str = "synthetic") -> ml_collections.ConfigDict:
    """Model, quantizer, loss, optimizer and loop settings shared by the CMG and COMET configs.

    `size='reference'` has the reference's dimensions (CMG `pretrain.py`: video 10x7x7x512, audio
    10x128, text 10x768, codebook 400x256, batch 80, Adam 4e-4); `size='small'` trains on 2 CPU cores
    in minutes. The caller adds `stages` (and `eval.data`), and the input shape of a modality without
    a default one (a registered new modality: docs/adding_a_modality.md).
    """
    if size not in ("small", "reference"):
        raise ValueError(f"size must be 'small' or 'reference', got {size!r}.")
    reference = size == "reference"
    # Pre-extracted features come at the reference dimensions of the paper's extractors.
    shapes = (configlib.digits_shapes() if data == "digits" else configlib.numbers_shapes() if data == "numbers" else
              REFERENCE_SHAPES if reference or data == "features" else SMALL_SHAPES)
    c = ml_collections.ConfigDict()
    c.method = "cmg"
    c.seed = 0
    c.size = size
    c.batch_size = 80 if reference else 32
    c.mesh = (("data", -1),)  # tuples, so that --config.mesh="(('data', 2), ('fsdp', 4))" works
    c.sharding_rules = ()
    c.frozen_patterns = []
    c.log_every = 50 if reference else 25
    c.checkpoint = dict(every=500 if reference else 200, max_to_keep=2)
    c.writers = "jsonl"  # comma-separated: jsonl, tensorboard, wandb (`unialign_jax.writers`)
    c.profile = dict(start_step=10, num_steps=0)  # num_steps > 0: a JAX profiler trace into workdir/profile/
    c.model = dict(
        modalities=tuple(modalities),
        input_shapes={m: tuple(shapes[m]) for m in modalities if m in shapes},
        semantic_dim=256 if reference else 64,
        num_heads=4,
        ffn_dim=1024 if reference else 128,
        num_layers=2,
        dropout=0.1,
        specific_dims={m: 256 if reference else 64 for m in modalities},
        video_encoder_channels=(1024, 2048) if reference else (32, 64),
        video_club_dim=512 if reference else 32,
        cpc_hidden=256 if reference else 64,
        cpc_layers=2,
        cpc_prediction_steps=1,
        club_hidden=128 if reference else 32,
        adapter_experts=0,
        adapter_specific_layers=True,
        dtype="float32",
        remat=False,
        scan_layers=False,
    )
    c.quantizer = dict(
        codebook_capacity=400 if reference else 64,
        initial_active_codes=400 if reference else 64,
        decay=0.99,
        epsilon=1e-5,
        dead_code_steps=300,
        active_code_steps=100,
        restart_noise=1 / 1024,
        reset_ema_on_restart=False,
    )
    c.loss = dict(
        weights=dict(reconstruction=1.0, commitment=1.0, cmcm=1.0, cpc=1.0, club=1.0, gate=1.0),
        commitment_beta=0.25,
        cpc_normalize_over="predictions",
        cpc_cross_weight=1.0,
        cpc_self_weight=0.1,
    )
    c.club = dict(steps=5, learning_rate=1e-3)
    c.optim = optim.optimizer_config(
        "adam", 4e-4 if reference else 1e-3, weight_decay=0.0, schedule="constant", clip_norm=0.5,
        groups=[
            ("encoder", r"^(semantic_encoder|specific_encoder|video_pooler|adapter)"),
            ("decoder", r"^decoder_"),
            ("cpc", r"^cpc_"),
            ("other", r".*"),
        ],
    )
    c.continual = dict(
        pseudo_modality=False,
        pmr_teacher="live",  # 'live' (the paper): PMR reads the current mediator; 'frozen': its stage-start copy
        ewc=False,
        ewc_strength=1.0,
        ewc_router=False,  # beyond the paper's scope: EWC also on the adapter's router
        ewc_extra=(),
        fisher_batches=10,
        fisher_micro_batch_size=4,  # examples per squared gradient of the empirical Fisher
        mediator_distillation=0.0,  # weight of the feature distillation from the stage-start mediator
        own_codes=False,  # beyond the paper: codes absent modalities still use are not updated or restarted
        code_owner_min_share=0.01,  # ... where a code holds at least this share of such a modality's tokens
        growth_examples=500,
    )
    c.eval = dict(paired=data in ("synthetic", "features"), head_steps=400, head_learning_rate=1e-3, head_batch_size=64, batch_size=250, max_examples=1000, data=None)
    return c


# data=numbers: stages over the integers 0-99 in windows of 40 that move by 30 (0-39, 30-69, 60-99).
NUMBERS_CONCEPTS, NUMBERS_WINDOW, NUMBERS_SHIFT = 100, 40, 30


def concept_windows(num_stages: int, num_concepts: int = 10, width: int = 6, shift: int = 2) -> list[tuple[int, ...]]:
    """Partially overlapping class subsets, one per stage: later stages bring new semantics."""
    return [tuple(sorted((i * shift + j) % num_concepts for j in range(width))) for i in range(num_stages)]


def continual_config(arg: str | None, pairs: list[tuple[str, str]], *, mediator: str = "text",
                     comet: bool = True) -> ml_collections.ConfigDict:
    """COMET (or the DCID baseline) over bimodal stages linked by `mediator`.

    Arg string: `data=digits|numbers|synthetic|features` (digits, the default, and numbers fall back to
    the synthetic world for modalities they lack, e.g. speech; numbers: each stage reads the dataset of
    its non-mediator modality (video, image: handwritten; audio: spoken; printed) over its window of
    `NUMBERS_WINDOW` of the 100 concepts, evaluation reads each modality's dataset over all 100 (text:
    the first stage's captions); `features` reads the user's converted datasets at the
    reference dimensions: `datasets=vatex+audiocaps+flickr` one per stage, `eval_dataset=NAME`),
    `size=small|reference`, `seed=N`, `steps=N` (per stage), and the
    COMET switches of the paper's ablation (Table 6), each `true|false`: `pm` (Pseudo-Modality
    Replay), `moe` (CMoE-Adapter), `gate` (its load-balancing loss), `ewc`, `sl` (the adapter's
    modality-specific layers); `ewc_lambda=X` (λ of Eq. 6, default 1e4, chosen by a seed-0 sweep
    over 1e2, 1e3, 1e4 with the empirical Fisher, README; the paper gives none).
    Options beyond the paper (defaults: the paper's method): `ewc_mediator=true` (EWC also on the
    mediator's semantic encoder), `ewc_router=true` (EWC also on the adapter's router),
    `pmr_teacher=live|frozen` (PMR reads the live mediator, or a frozen copy of it as it was at the
    start of the stage), `lwf=W` (feature distillation from that stage-start mediator, weight W),
    `own_codes=true` (codes that absent modalities still use are neither EMA-updated nor restarted). COMET
    configs grow the codebook at every stage; the DCID baseline (`comet=False`: every switch off)
    keeps one fixed codebook of the same total size.
    """
    arg = configlib.parse_arg(arg, data="digits", size="small", seed=0, steps=0, pm=comet, moe=comet, gate=comet,
                    ewc=comet, sl=comet, ewc_lambda=1e4, ewc_mediator=False, ewc_router=False,
                    pmr_teacher="live", lwf=0.0, own_codes=False, datasets="", eval_dataset="")
    modalities = tuple(dict.fromkeys(m for pair in pairs for m in pair))
    data_name = resolve_data(arg.data, modalities)
    config = cmg_config(size=arg.size, modalities=modalities, data=data_name)
    config.seed = arg.seed
    reference = arg.size == "reference"
    first_rows, later_rows = (400, 100) if reference else (48, 16)
    total_rows = first_rows + later_rows * (len(pairs) - 1)
    config.quantizer.codebook_capacity = total_rows
    config.quantizer.initial_active_codes = first_rows if comet else total_rows
    config.model.adapter_experts = 6 if arg.moe else 0
    config.model.adapter_specific_layers = arg.sl
    config.loss.weights.gate = 1.0 if (arg.moe and arg.gate) else 0.0
    config.continual.pseudo_modality = arg.pm
    config.continual.ewc = arg.ewc and arg.moe  # EWC protects the adapter's layers (COMET §3.2)
    config.continual.ewc_strength = float(arg.ewc_lambda)
    config.continual.ewc_router = arg.ewc_router
    config.continual.pmr_teacher = arg.pmr_teacher
    config.continual.mediator_distillation = float(arg.lwf)
    config.continual.own_codes = arg.own_codes
    if arg.ewc_mediator:  # beyond the paper: also protect the mediator's semantic encoder
        config.continual.ewc_extra = (rf"^semantic_encoder_{mediator}/",)
    steps = arg.steps or (3000 if reference else 400)
    shapes = dict(config.model.input_shapes)
    windows = (concept_windows(len(pairs), NUMBERS_CONCEPTS, NUMBERS_WINDOW, NUMBERS_SHIFT) if data_name == "numbers"
               else concept_windows(len(pairs)))
    config.stages = []
    for index, (pair, concepts) in enumerate(zip(pairs, windows)):
        rows = (first_rows if comet else total_rows) if index == 0 else (later_rows if comet else 0)
        if data_name == "digits":
            data = configlib.digits_data(classes=concepts, seed=arg.seed)
        elif data_name == "features":
            data = configlib.features_data(_stage_datasets(arg.datasets, len(pairs))[index])
        elif data_name == "numbers":
            data = configlib.numbers_data(_numbers_dataset(pair, mediator), concepts=concepts, seed=arg.seed)
        else:
            data = configlib.synthetic_data(pair, shapes, concepts=concepts, seed=arg.seed)
        name = "_".join(pair)
        config.stages.append(configlib.stage(name, pair, data, steps=steps, codebook_rows=rows,
                                   mediator=mediator if index else ""))
    if data_name == "features":
        if not arg.eval_dataset:
            raise ValueError("data=features needs eval_dataset=NAME: a converted dataset holding the modalities to "
                             "evaluate (pairs it lacks are skipped).")
        config.eval.data = configlib.features_data(arg.eval_dataset)
    elif data_name == "digits":
        config.eval.data = configlib.digits_data(seed=arg.seed)
    elif data_name == "numbers":  # one dataset per modality, every concept; text: the first stage's captions
        first = _numbers_dataset(pairs[0], mediator)
        config.eval.data = {
            m: configlib.numbers_data(first if m == mediator else _numbers_dataset((m,), mediator),
                                      concepts=tuple(range(NUMBERS_CONCEPTS)), seed=arg.seed)
            for m in modalities
        }
    else:
        config.eval.data = configlib.synthetic_data(modalities, shapes, seed=arg.seed)
    return config


def _numbers_dataset(pair: tuple[str, ...], mediator: str) -> str:
    """The numbers dataset of a stage: the one providing its modality other than the mediator (text)."""
    from unialign_jax.data import numbers  # pylint: disable=import-outside-toplevel

    (modality,) = [m for m in pair if m != mediator]
    return numbers.MODALITY_DATASETS[modality]


def joint_config(arg: str | None, pairs: list[tuple[str, str]]) -> ml_collections.ConfigDict:
    """The joint bound of a continual run: ONE stage that trains every pair of `pairs` together in
    mixed batches (`model.train_iterator`; e.g. video and audio never paired).

    Each pair keeps the classes of its stage in the continual run (`concept_windows`: 0-5, 2-7, 4-9)
    and its own shuffle of the data; a step sees one batch of every pair, so `steps` (default 400,
    one continual stage's) gives every pair as many batches as in the continual run. The model and
    codebook (all stages' codes, active from the start) are COMET's; `moe=false` drops the adapter,
    `sl=false` its specific layers, `gate=false` its gate loss. Arg string otherwise as
    `continual_config` (`data=digits|synthetic`, `size`, `seed`, `steps`).
    """
    arg = configlib.parse_arg(arg, data="digits", size="small", seed=0, steps=0, moe=True, gate=True, sl=True)
    modalities = tuple(dict.fromkeys(m for pair in pairs for m in pair))
    data_name = resolve_data(arg.data, modalities)
    if data_name == "features":
        raise ValueError("joint_config reads digits or synthetic data; data=features is not supported.")
    config = cmg_config(size=arg.size, modalities=modalities, data=data_name)
    config.seed = arg.seed
    reference = arg.size == "reference"
    total_rows = (400 + 100 * (len(pairs) - 1)) if reference else (48 + 16 * (len(pairs) - 1))
    config.quantizer.codebook_capacity = total_rows
    config.quantizer.initial_active_codes = total_rows
    config.model.adapter_experts = 6 if arg.moe else 0
    config.model.adapter_specific_layers = arg.sl
    config.loss.weights.gate = 1.0 if (arg.moe and arg.gate) else 0.0
    shapes = dict(config.model.input_shapes)
    groups = []
    for pair, concepts in zip(pairs, concept_windows(len(pairs))):
        if data_name == "digits":
            groups.append((pair, configlib.digits_data(classes=concepts, seed=arg.seed)))
        else:
            groups.append((pair, configlib.synthetic_data(pair, shapes, concepts=concepts, seed=arg.seed)))
    steps = arg.steps or (3000 if reference else 400)
    config.stages = [configlib.stage("joint", modalities, groups[0][1], steps=steps, codebook_rows=total_rows,
                                     pairs=tuple(groups))]
    config.eval.data = (configlib.digits_data(seed=arg.seed) if data_name == "digits"
                        else configlib.synthetic_data(modalities, shapes, seed=arg.seed))
    return config


def _stage_datasets(datasets: str, num_stages: int) -> list[str]:
    names = [name for name in datasets.split("+") if name]
    if len(names) != num_stages:
        raise ValueError(f"data=features needs datasets=NAME1+NAME2+... with one converted dataset per stage "
                         f"({num_stages}), got {datasets!r}.")
    return names
