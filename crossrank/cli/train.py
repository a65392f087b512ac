"""``crossrank train`` and ``train-encoder``: the shell over :mod:`crossrank.training`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from crossrank.cli.app import _friendly_errors, _print_json, app
from crossrank.cli.render import (
    console,
    progress_bar,
)
from crossrank.device import Device


@app.command("train-encoder")
@_friendly_errors
def train_encoder_cmd(
    data: Annotated[
        Path,
        typer.Option(help="A shapes dataset made with `crossrank dataset shapes --split train`."),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Where the model goes (Hugging Face format); a checkpoint there is resumed.",
        ),
    ],
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=2, help="Images per step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    caption_negatives: Annotated[
        int | None,
        typer.Option(
            min=0,
            help=(
                "NegCLIP: per caption, this many rewrites false of its image (swapped bindings or "
                "objects, another relation) as extra text negatives, so the encoder cannot treat a "
                "caption as a bag of words. 0 = off."
            ),
        ),
    ] = None,
    init_from: Annotated[
        str | None,
        typer.Option(
            help=(
                "Fine-tune this CLIP (a directory made by train-encoder, or crossrank-demo for the "
                "shipped one) instead of training from scratch."
            )
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    device: Annotated[Device, typer.Option(help="Where to train.")] = Device.AUTO,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Train the demo dual encoder (a small CLIP) on generated pairs.

    From scratch, or fine-tuned from --init-from. Settings left out keep EncoderTrainConfig's
    defaults.
    """
    import shlex
    import time

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from crossrank.training.encoder import (
        DEMO_SPEC,
        EncoderTrainConfig,
        shapes_train_data,
        train_encoder,
    )

    try:
        given = _given(
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            caption_negatives=caption_negatives,
            init_from=init_from,
        )
        config = EncoderTrainConfig(**given, device=device.value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if init_from is not None:  # fail before the minute of loading images, not after
        from crossrank.encoders.loading import resolve_model

        resolve_model(init_from)
    t0 = time.perf_counter()
    train_data = shapes_train_data(
        data, DEMO_SPEC.image_size, caption_negatives=config.caption_negatives > 0
    )
    with progress_bar(
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=as_json,
        loss="-",
    ) as update:
        path = train_encoder(
            train_data,
            out,
            config,
            progress=lambda step, total, loss: update(
                completed=step, total=total, loss=f"{loss:.3f}"
            ),
            extra={"command": "crossrank " + shlex.join(sys.argv[1:])},
        )
    summary = {
        "out": str(path),
        "steps": config.steps,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if as_json:
        _print_json(summary)
    else:
        console.print(
            f"[green]trained[/] {config.steps} steps in {summary['seconds']} s -> "
            f"{escape(str(path))}",
            highlight=False,
        )


@app.command("train")
@_friendly_errors
def train_cmd(
    pairs: Annotated[
        Path,
        typer.Argument(
            help=(
                "Training pairs: .parquet/.csv with `path` and `caption` (paths relative to "
                "its folder)."
            )
        ),
    ],
    index: Annotated[
        Path,
        typer.Option(
            "--index",
            "-i",
            help="An index built over the pairs' images (its encoder stays frozen).",
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help=(
                "Where the reranker goes (safetensors + config.json); a checkpoint there "
                "is resumed. "
                "Use DIR/reranker to make it the index's default."
            ),
        ),
    ],
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help=(
                "A reranker config.json, as a checkpoint saves it (or its folder): its "
                "architecture, and its recorded training settings when it has them, replace "
                "the library defaults (not its --init-from or --teacher: give your own); the "
                "flags below override both."
            ),
            show_default=False,
        ),
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Queries per step.")] = None,
    candidates: Annotated[
        int | None, typer.Option(min=2, help="Candidates per query: 1 positive + negatives.")
    ] = None,
    loss: Annotated[
        str | None,
        typer.Option(help="listwise (softmax over each candidate list) or itm (binary matching)."),
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    hard_fraction: Annotated[
        float | None,
        typer.Option(help="Share of negatives mined from the first stage's top candidates."),
    ] = None,
    curriculum: Annotated[
        float | None,
        typer.Option(help="Share of the steps over which the hard share ramps up from 0."),
    ] = None,
    mine_k: Annotated[
        int | None, typer.Option(min=2, help="First-stage depth mined for hard negatives.")
    ] = None,
    eval_every: Annotated[
        int | None, typer.Option(min=1, help="Steps between validations and checkpoints.")
    ] = None,
    layers: Annotated[int | None, typer.Option(min=1, help="Cross-attention layers.")] = None,
    width: Annotated[int | None, typer.Option(min=8, help="Reranker width.")] = None,
    heads: Annotated[int | None, typer.Option(min=1, help="Attention heads.")] = None,
    gated: Annotated[
        bool | None,
        typer.Option(
            help=(
                "Tanh gates on the residual branches, initialised at 0 (an untrained model is the "
                "identity; slower to learn from scratch)."
            )
        ),
    ] = None,
    prenorm: Annotated[
        bool | None, typer.Option(help="A LayerNorm per modality before projecting.")
    ] = None,
    patch_self_attention: Annotated[
        bool | None,
        typer.Option(help="Patches of a candidate attend to each other in every layer."),
    ] = None,
    bidirectional: Annotated[
        bool | None, typer.Option(help="Patches attend back to the query tokens in every layer.")
    ] = None,
    query_self_attention: Annotated[
        bool | None,
        typer.Option(
            help="Query positions attend to each other in every layer (compares what they read)."
        ),
    ] = None,
    patch_positions: Annotated[
        int | None,
        typer.Option(
            min=0,
            help=(
                "Learned position embedding over this many patch slots (default: the index's "
                "patches "
                "per image; 0 = none)."
            ),
            show_default=False,
        ),
    ] = None,
    pair_head: Annotated[
        bool | None,
        typer.Option(
            help=(
                "A pairwise spatial head: each pair of query positions scored from their "
                "states and the difference of where they looked (for relations such as "
                "'left of'). Needs a square patch grid."
            )
        ),
    ] = None,
    pair_width: Annotated[
        int | None,
        typer.Option(
            help=(
                "The pair head's hidden size per pair (default: --width); smaller is cheaper "
                "(docs/rerankers.md)."
            ),
            show_default=False,
        ),
    ] = None,
    token_embeddings: Annotated[
        bool | None,
        typer.Option(
            help=(
                "Also read the text encoder's layer-0 token states (token plus position "
                "embeddings) "
                "beside its last layer's token features: words the last layer merges (the "
                "demo encoder's "
                "'left' and 'right') stay apart. Search and eval then encode queries with them."
            )
        ),
    ] = None,
    query_tokens: Annotated[
        int | None,
        typer.Option(min=0, help="Learnable Q-Former-style query tokens beside the text tokens."),
    ] = None,
    sparse_top_m: Annotated[
        int | None, typer.Option(min=1, help="Each query token attends to its top-m patches only.")
    ] = None,
    init: Annotated[
        str | None,
        typer.Option(
            help=(
                "Weight init from scratch: lecun (std 1/sqrt(fan_in), learns binding faster) "
                "or bert "
                "(std 0.02)."
            )
        ),
    ] = None,
    first_stage_weight: Annotated[
        str | None,
        typer.Option(
            help=(
                "Residual training: logits add W x the first-stage cosine, so the reranker learns "
                "a correction; search then fuses with weighted:1/(1+W) by default. auto "
                "= the encoder's "
                "logit scale (CLIP's exp(logit_scale), 35.9 for the demo encoder; 0 for an encoder "
                "without one); 0 = off."
            )
        ),
    ] = None,
    caption_negatives: Annotated[
        int | None,
        typer.Option(
            min=0,
            help=(
                "Per pair, this many rewrites of its caption that are false of its image (swapped "
                "colours, shapes or objects, another relation, one object changed), ranked against "
                "the true caption: a text-side loss that teaches binding. Needs a pairs file in a "
                "shapes dataset (its scene graphs decide what is false). 0 = off."
            ),
        ),
    ] = None,
    caption_only_steps: Annotated[
        int | None,
        typer.Option(
            min=0,
            help=(
                "Curriculum: the first N steps train on the caption negatives alone (the reranker "
                "by itself, no residual, no image lists; cheaper steps), then both losses. "
                "Needs --caption-negatives."
            ),
        ),
    ] = None,
    attention_supervision: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help=(
                "Weight of a loss that pulls the last layer's attention of each object word of the "
                "true caption onto that object's patches (from the scene graphs: needs "
                "--caption-negatives on a shapes dataset). 0 = off."
            ),
        ),
    ] = None,
    init_from: Annotated[
        Path | None,
        typer.Option(
            "--init-from",
            help=(
                "Fine-tune: start from this reranker folder's weights instead of a fresh init "
                "(e.g. the shipped one, `crossrank info --json` names it). Its architecture "
                "is the default; flags that change it are refused."
            ),
        ),
    ] = None,
    relation_share: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help=(
                "Share of each step's caption-negative lists given to relation captions "
                "ranked only "
                "against their rewrites that keep both objects (another relation, or the "
                "objects swapped around it): the lists where the relation is the whole signal. "
                "Needs --caption-negatives. 0 = off."
            ),
        ),
    ] = None,
    teacher: Annotated[
        Path | None,
        typer.Option(
            "--teacher",
            exists=True,
            file_okay=False,
            help=(
                "Distil: a trained reranker folder over the same encoder (e.g. the shipped "
                "one) whose scores over every list this run ranks become soft targets beside "
                "the labels. Any architecture; the student is the one the flags describe."
            ),
        ),
    ] = None,
    distill: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Weight of the distillation loss (KL from the teacher's list softmax); needs "
            "--teacher.",
        ),
    ] = None,
    distill_temperature: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Softmax temperature of distillation: above 1 softens both lists' distributions.",
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    device: Annotated[Device, typer.Option(help="Where to train.")] = Device.AUTO,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Fine-tune a cross-attention reranker over an index's frozen encoder features.

    Settings left out keep the library's defaults (RerankerConfig, RerankTrainConfig).
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from crossrank.api.index import Index
    from crossrank.errors import InvalidArgumentError
    from crossrank.training import RerankTrainConfig, train_reranker
    from crossrank.training.reranker import resolve_model_config

    model_fields, train_fields = _read_train_config(config_file)
    if init_from is not None:
        # its architecture first: --config's and the flags below override (and must match it)
        model_fields = {**_read_train_config(init_from, flag="--init-from")[0], **model_fields}
        train_fields["init_from"] = str(init_from)
    model_fields.update(
        _given(
            layers=layers,
            width=width,
            heads=heads,
            gated=gated,
            prenorm=prenorm,
            patch_self_attention=patch_self_attention,
            bidirectional=bidirectional,
            query_self_attention=query_self_attention,
            patch_positions=patch_positions,
            pair_head=pair_head,
            pair_width=pair_width,
            n_query_tokens=query_tokens,
            sparse_top_m=sparse_top_m,
            init=init,
            token_embeddings=None if token_embeddings is None else int(token_embeddings),
        )
    )
    train_fields.update(
        _given(
            steps=steps,
            batch_size=batch_size,
            n_candidates=candidates,
            loss=loss,
            lr=lr,
            hard_fraction=hard_fraction,
            curriculum=curriculum,
            mine_k=mine_k,
            eval_every=eval_every,
            checkpoint_every=eval_every,  # --eval-every sets both
            seed=seed,
            first_stage_weight=_first_stage_weight(first_stage_weight),
            caption_negatives=caption_negatives,
            caption_only_steps=caption_only_steps,
            attention_supervision=attention_supervision,
            relation_share=relation_share,
            teacher=None if teacher is None else str(teacher),
            distill=distill,
            distill_temperature=distill_temperature,
        ),
        device=device.value,
    )
    if (distill is not None or distill_temperature is not None) and teacher is None:
        raise typer.BadParameter(
            "--distill and --distill-temperature weigh a teacher's targets; give --teacher DIR"
        )
    if steps is not None and "warmup" in train_fields and config_file is not None:
        train_fields.pop("warmup")  # the file's warm-up was sized for its own step count
    try:
        config = RerankTrainConfig(**train_fields)
    except (TypeError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None
    idx = Index.open(index, device=device.value)
    try:  # after opening: the default patch positions are the index encoder's patch count
        model_config = resolve_model_config(model_fields, idx.manifest.encoder, idx)
    except InvalidArgumentError as e:
        raise typer.BadParameter(str(e)) from None
    with progress_bar(
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]} acc {task.fields[acc]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=as_json,
        loss="-",
        acc="-",
    ) as update:
        report = train_reranker(
            idx,
            pairs,
            out,
            model_config=model_config,
            config=config,
            progress=lambda step, total, lss, acc: update(
                completed=step, total=total, loss=f"{lss:.3f}", acc=f"{acc:.2f}"
            ),
        )
    if as_json:
        _print_json(report.to_dict())
        return
    console.print(
        f"[green]trained[/] {report.steps} steps ({report.steps_per_second:.1f} steps/s on "
        f"{report.device}) "
        f"-> {escape(str(report.out_dir))}"
    )
    if report.first_stage_weight > 0:
        console.print(
            f"residual over the first stage with W = {report.first_stage_weight:g}: search fuses "
            "with "
            f"weighted:{1 / (1 + report.first_stage_weight):.6g} (--fusion auto)"
        )
    else:
        console.print(
            "no first-stage residual (W = 0): search ranks by the reranker's score alone (--fusion "
            "auto)"
        )
    if report.final:
        console.print(
            f"validation R@1 reranking the top {config.mine_k}: "
            f"{report.final.get('val_r1', float('nan')):.3f} "
            f"(first stage {report.first_stage.get('r1', float('nan')):.3f}); "
            f"accuracy among {config.n_candidates} candidates "
            f"{report.final.get('val_accuracy', float('nan')):.3f}"
        )
        if "val_caption_accuracy" in report.final:
            console.print(
                "validation caption accuracy (the true caption first among "
                f"{config.caption_negatives} rewrites): "
                f"{report.final['val_caption_accuracy']:.3f}"
            )
    skipped = report.counts.get("missing_image", 0) + report.counts.get("empty_caption", 0)
    if skipped:
        console.print(
            f"[yellow]skipped {skipped} pairs[/] ({report.counts.get('missing_image', 0)} images "
            "not in the "
            f"index, {report.counts.get('empty_caption', 0)} empty captions)"
        )


def _given(**values: Any) -> dict[str, Any]:
    """The settings given on the command line (None = left out: the library default applies)."""
    return {name: value for name, value in values.items() if value is not None}


def _first_stage_weight(text: str | None) -> float | str | None:
    """``--first-stage-weight``: auto, a number, or None when left out."""
    if text is None or text.strip().lower() == "auto":
        return None if text is None else "auto"
    try:
        return float(text)
    except ValueError:
        raise typer.BadParameter(
            f"--first-stage-weight must be auto or a number >= 0, got {text!r}"
        ) from None


def _read_train_config(
    path: Path | None, flag: str = "--config"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The architecture fields and the recorded training settings of a reranker ``config.json``
    (or of the folder holding one), given as ``flag``; two empty dicts without it."""
    import dataclasses

    if path is None:
        return {}, {}
    file = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise typer.BadParameter(
            f"{flag} {file} does not exist; give a reranker's config.json"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise typer.BadParameter(f"{flag} {file} is not readable JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise typer.BadParameter(
            f'{flag} {file} holds no reranker config: expected a JSON object with a "config" '
            "object of RerankerConfig fields, as a checkpoint's config.json has"
        )
    metadata = data.get("metadata")
    train = metadata.get("train") if isinstance(metadata, dict) else None
    train = dict(train) if isinstance(train, dict) else {}
    from crossrank.training import RerankTrainConfig

    unknown = sorted(set(train) - {f.name for f in dataclasses.fields(RerankTrainConfig)})
    if unknown:
        raise typer.BadParameter(
            f"{flag} {file} records unknown training settings {unknown} in metadata.train "
            "(was it written by a newer crossrank?)"
        )
    # Inputs of that run, not settings: a fine-tune or a distillation names its own.
    for name in ("init_from", "teacher"):
        train.pop(name, None)
    return dict(data["config"]), train
