"""`petbreed`: the one command-line entry point. Each subcommand is a thin shell over a module.

Errors a user can fix (bad paths, bad data, bad settings, missing buckets) print one line and
exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    help="Fine-tune Gemma 4 to recognise pet breeds, serve it, try it.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _user_errors() -> tuple[type[BaseException], ...]:
    from pydantic import ValidationError

    from adapter_contract.storage import StorageError
    from finetune.data import DataError

    return (DataError, StorageError, ValidationError, FileNotFoundError, NotADirectoryError)


def _one_line(err: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
    return " ".join(str(err).split())


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _user_errors() as err:
            typer.echo(f"petbreed: error: {_one_line(err)}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command("make-tiny-model")
@friendly
def make_tiny_model(
    out: Path,
    shape: Annotated[str, typer.Option(help="tiny; tiny-kv: 4 layers, the last 2 sharing KV as E2B/E4B's do; "
                                   "e4b: google/gemma-4-E4B-it's shape, for GPUs")] = "tiny",
    seed: int = 0,
    text_hidden: Annotated[int, typer.Option(help="tiny: language model width")] = 64,
    vision_hidden: Annotated[int, typer.Option(help="tiny: vision tower width")] = 32,
    init_std: Annotated[float | None, typer.Option(help="weight init std (tiny: 0.1, learns faster)")] = None,
    device: Annotated[str, typer.Option(help="where to build the weights (cuda for e4b)")] = "cpu",
    audio: Annotated[bool, typer.Option(help="an audio tower too, as google/gemma-4-E2B/E4B have")] = False,
) -> None:
    """Build a random-weight Gemma 4 (real classes, tokenizer, processor) in OUT."""
    from finetune.tiny_model import TinyModelConfig
    from finetune.tiny_model import make_tiny_model as build

    cfg = TinyModelConfig(
        shape=shape, seed=seed, text_hidden=text_hidden, vision_hidden=vision_hidden,  # type: ignore[arg-type]
        init_std=init_std, device=device, audio=audio,
    )
    typer.echo(build(out, cfg))


@app.command("make-synthetic-data")
@friendly
def make_synthetic_data(
    out: Path,
    breeds: int = 6,
    first: Annotated[int, typer.Option(help="skip this many breeds of the fixed order")] = 0,
    level: str = "easy",
    train_per_breed: int = 40,
    test_per_breed: int = 20,
    size: int = 96,
    seed: int = 0,
) -> None:
    """Write a synthetic pets dataset (Oxford-IIIT Pet layout) to OUT."""
    from finetune.synthetic import SyntheticConfig
    from finetune.synthetic import make_synthetic_data as build

    cfg = SyntheticConfig(breeds=breeds, first=first, level=level, train_per_breed=train_per_breed,  # type: ignore[arg-type]
                          test_per_breed=test_per_breed, size=size, seed=seed)
    typer.echo(build(out, cfg))


@app.command(context_settings=_PASS_THROUGH)
@friendly
def train(ctx: typer.Context) -> None:
    """Train, evaluate and publish a LoRA adapter. Flags: `petbreed train --help`."""
    from finetune.pipeline import run_training
    from finetune.settings import TrainSettings

    settings = TrainSettings(_cli_parse_args=ctx.args, _cli_prog_name="petbreed train")  # type: ignore[call-arg]
    typer.echo(run_training(settings).model_dump_json(indent=2))


@app.command("eval", context_settings=_PASS_THROUGH)
@friendly
def evaluate(ctx: typer.Context) -> None:
    """Evaluate a published adapter and its base on a dataset. Flags: `petbreed eval --help`."""
    from finetune.eval_job import EvalSettings, run_eval

    settings = EvalSettings(_cli_parse_args=ctx.args, _cli_prog_name="petbreed eval")  # type: ignore[call-arg]
    typer.echo(run_eval(settings).model_dump_json(indent=2))


@app.command("batch-predict", context_settings=_PASS_THROUGH)
@friendly
def batch_predict(ctx: typer.Context) -> None:
    """Label a list of images with an adapter, sharded over Cloud Run job tasks. Flags: `--help`."""
    from finetune.batch_predict import BatchPredictSettings, run_batch_predict

    settings = BatchPredictSettings(_cli_parse_args=ctx.args, _cli_prog_name="petbreed batch-predict")  # type: ignore[call-arg]
    typer.echo(run_batch_predict(settings).model_dump_json(indent=2))


def _register_servers() -> None:
    # Their modules import only typer at the top; uvicorn, vLLM and Gradio load when run.
    from serve.cli import serve
    from ui.cli import ui

    app.command("serve")(serve)
    app.command("ui")(ui)


_register_servers()


def main() -> None:
    app(prog_name="petbreed")


if __name__ == "__main__":
    main()
