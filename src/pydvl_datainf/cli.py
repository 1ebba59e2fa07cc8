"""The `pydvl-datainf` command line: fit DataInf on a fine-tuned model and rank
training rows, without writing Python.

```bash
pydvl-datainf fit --model base/ --adapter adapter/ --data train.jsonl --store grads.zarr
pydvl-datainf self-influence --store grads.zarr --top 20
pydvl-datainf top-k --store grads.zarr --test test.jsonl -k 5 --output top.csv
pydvl-datainf mean-influence --store grads.zarr --test test.jsonl --harmful
pydvl-datainf matrix --store grads.zarr --test test.jsonl --output matrix.zarr
pydvl-datainf info --store grads.zarr       # the recorded run, as a command
pydvl-datainf replay --store grads.zarr --to again.zarr
```

Every query also takes the fit options instead of `--store` and then fits
first, so one command goes from an adapter to a table:
`pydvl-datainf self-influence --adapter adapter/ --data train.jsonl`.

**Model.** `--model` is a model folder or a GGUF file (read by `transformers`
with the `gguf` package), loaded offline; `--adapter` a PEFT adapter folder
(its trained adapters are the blocks). Without `--model`, the base model named
in the adapter's configuration is used, if it is a local path. The tokenizer
comes from `--tokenizer`, else the adapter folder if it has one, else the
model.

**Data.** JSON lines (`.jsonl`), JSON, CSV, Parquet, or a folder written by
`datasets`' `save_to_disk`. For a causal language model, each row has a
prompt and a completion (`--prompt-column`, `--completion-column`); the loss
is on the completion tokens and the end-of-sequence token, as TRL's
`SFTTrainer` trains by default (`--full-sequence` scores every token). A
`--text-column` alone is plain language modelling. For a classifier
(`--task sequence-classification`), `--text-column` and `--label-column`.

**Replay.** `fit` records its whole configuration (and a digest of the data
file) in the store. Queries on `--store` rebuild the model, the tokenizer and
the training rows from it and check every training row against the digests
recorded at fit; `info` prints the configuration and the command that makes
it; `replay` fits again from it.

Scores follow pyDVL's sign: positive means the training row helps (lowers the
test loss when up-weighted); the DataInf paper's influence is the negative.
"""

import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import shlex
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any, Callable, Dict, List, Optional, Tuple

import pandas as pd
import torch
import typer

from .dataset_influence import DatasetInfluence
from .errors import StoreMismatchError
from .hf import (
    TASKS,
    RightPaddingCollator,
    load_pretrained,
    tokenize_prompt_completion,
    wrap_model,
)
from .influence import DataInfInfluence
from .persistence import stored_metadata
from .scoring.frames import to_arrow

__all__ = ["app", "main", "FitOptions", "CLI_KEY", "build", "reopen"]

logger = logging.getLogger(__name__)

CLI_KEY = "cli"
"""The key of the fit metadata under which `fit` records its options."""

app = typer.Typer(
    name="pydvl-datainf",
    help="DataInf influence of training rows on a fine-tuned model "
    "(pyDVL sign: positive = helpful).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _option(help: str, *names: str, panel: str = "Fit", **kwargs: Any) -> Any:
    return typer.Option(*names, help=help, rich_help_panel=panel, **kwargs)


@dataclass
class FitOptions:
    """What `fit` was given: every option of the command, as recorded in the
    store (paths absolute)."""

    model: Annotated[
        Optional[str],
        _option("Model folder or GGUF file (default: the adapter's base model)."),
    ] = None
    adapter: Annotated[Optional[str], _option("PEFT adapter folder.")] = None
    tokenizer: Annotated[
        Optional[str],
        _option("Tokenizer folder (default: the adapter's, else the model's)."),
    ] = None
    data: Annotated[
        Optional[str],
        _option(
            "Training data: .jsonl, .json, .csv, .parquet or a save_to_disk folder."
        ),
    ] = None
    split: Annotated[str, _option("Split of a saved DatasetDict.")] = "train"
    task: Annotated[str, _option(f"One of {', '.join(TASKS)}.")] = "causal-lm"
    prompt_column: Annotated[str, _option("Prompt column.")] = "prompt"
    completion_column: Annotated[str, _option("Completion column.")] = "completion"
    text_column: Annotated[
        Optional[str],
        _option("Text column: plain language modelling, or a classifier's input."),
    ] = None
    label_column: Annotated[str, _option("Class label column (classifiers).")] = "label"
    id_column: Annotated[
        Optional[str], _option("Column of row ids (default: the row index).")
    ] = None
    max_length: Annotated[Optional[int], _option("Keep at most this many tokens.")] = (
        1024
    )
    completion_only: Annotated[
        bool,
        _option(
            "Loss on the completion only, or on every token.",
            "--completion-only/--full-sequence",
        ),
    ] = True
    add_eos: Annotated[
        bool, _option("End completions with the EOS token.", "--add-eos/--no-eos")
    ] = True
    batch_size: Annotated[
        int, _option("Rows per batch (scores do not depend on it).")
    ] = 8
    dtype: Annotated[str, _option("Model dtype: float32, bfloat16, float16.")] = (
        "float32"
    )
    regularization: Annotated[str, _option("'auto' or a positive float.")] = "auto"
    block_structure: Annotated[
        str, _option("Blocks: module (one per LoRA matrix), lora, parameter.")
    ] = "module"
    store_dtype: Annotated[
        Optional[str], _option("Stored gradient dtype (float32, bfloat16...).")
    ] = None
    data_sha256: Optional[str] = field(default=None, metadata={"recorded": True})

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "FitOptions":
        """Options from a recorded dict (unknown keys are refused)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise StoreMismatchError(
                f"The store records unknown command line options {sorted(unknown)}: "
                f"it was written by another version of pydvl-datainf"
            )
        return cls(**values)


@dataclass
class RunOptions:
    """Where the fit lives and how commands run."""

    store: Annotated[
        Optional[str],
        _option("Zarr gradient store (written by fit; read by queries).", panel="Run"),
    ] = None
    overwrite: Annotated[
        bool, _option("Replace a store this library wrote before.", panel="Run")
    ] = False
    device: Annotated[str, _option("auto, cpu, cuda, cuda:1, ...", panel="Run")] = (
        "auto"
    )
    progress: Annotated[bool, _option("Progress bars on stderr.", panel="Run")] = True


@dataclass
class TestOptions:
    """The test data of a query."""

    test: Annotated[
        Optional[str],
        _option(
            "Test data, in the format and columns of the training data.", panel="Query"
        ),
    ] = None
    test_split: Annotated[
        str, _option("Split of a saved test DatasetDict.", panel="Query")
    ] = "train"


@dataclass
class TableOptions:
    """Where a table goes."""

    output: Annotated[
        Optional[Path],
        _option(
            "Write the whole table (.csv, .jsonl, .json, .parquet).", panel="Output"
        ),
    ] = None
    show: Annotated[int, _option("Rows printed (0: none).", panel="Output")] = 20


def _fields(group: type) -> List[dataclasses.Field]:
    return [f for f in dataclasses.fields(group) if not f.metadata.get("recorded")]


def _with(**groups: type) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command the options of dataclasses (`name=Options`): each field
    becomes a keyword option, and the command receives one instance per group
    as the argument `name`."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.name not in groups]
        added = [
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=f.default,
                annotation=group.__annotations__[f.name],
            )
            for group in groups.values()
            for f in _fields(group)
        ]

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> None:
            made = {
                name: group(**{f.name: kwargs.pop(f.name) for f in _fields(group)})
                for name, group in groups.items()
            }
            command(**made, **kwargs)

        wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=own + added
        )
        wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
        return wrapper

    return decorate


# ----------------------------------------------------------------- loading
def _digest(path: Path) -> str:
    """SHA-256 of a file, or of every file of a folder (names and bytes)."""
    h = hashlib.sha256()
    files = (
        [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    )
    for p in files:
        h.update(str(p.relative_to(path) if p != path else p.name).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_rows(path: str, split: str = "train") -> Any:
    """A map-style dataset from a data file or a `save_to_disk` folder."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"No data at {path!r}")
    if p.is_dir():
        data = datasets.load_from_disk(str(p))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise KeyError(f"{path!r} has splits {list(data)}, not {split!r}")
            data = data[split]
        return data
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        text = p.read_text(encoding="utf-8")
        stripped = text.lstrip()
        if suffix == ".json" and stripped.startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return datasets.Dataset.from_list(rows)
    if suffix == ".csv":
        return datasets.Dataset.from_pandas(
            pd.read_csv(p, dtype=str, keep_default_na=False), preserve_index=False
        )
    if suffix == ".parquet":
        return datasets.Dataset.from_pandas(pd.read_parquet(p), preserve_index=False)
    raise ValueError(
        f"Unknown data format {suffix!r} of {path!r}: use .jsonl, .json, .csv, "
        f".parquet or a save_to_disk folder"
    )


class TokenizedRows:
    """A dataset whose rows gain their tokens when read (nothing is copied or
    cached on disk); columns of the underlying dataset read through."""

    def __init__(
        self, dataset: Any, tokenize: Callable[[Dict[str, Any]], Dict[str, Any]]
    ):
        self.dataset = dataset
        self.tokenize = tokenize
        self.column_names = list(getattr(dataset, "column_names", []) or [])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return self.dataset[key]
        row = dict(self.dataset[int(key)])
        row.update(self.tokenize(row))
        return row


class _Tokenize:
    """Tokenizes one row as the options say (a picklable callable)."""

    def __init__(self, tokenizer: Any, options: FitOptions):
        self.tokenizer = tokenizer
        self.options = options

    def _get(self, row: Dict[str, Any], column: str) -> Any:
        if column not in row:
            raise KeyError(f"The data have no column {column!r}; columns: {list(row)}")
        return row[column]

    def __call__(self, row: Dict[str, Any]) -> Dict[str, Any]:
        o = self.options
        if o.task == "sequence-classification":
            column = o.text_column or "text"
            enc = self.tokenizer(
                str(self._get(row, column)),
                truncation=o.max_length is not None,
                max_length=o.max_length,
            )
            return {
                "input_ids": list(enc["input_ids"]),
                "attention_mask": list(enc["attention_mask"]),
                "labels": int(self._get(row, o.label_column)),
            }
        eos = self.tokenizer.eos_token if o.add_eos else None
        if o.text_column is not None:
            prompt, completion, only = "", str(self._get(row, o.text_column)), False
        else:
            prompt = str(self._get(row, o.prompt_column))
            completion = str(self._get(row, o.completion_column))
            only = o.completion_only
        return tokenize_prompt_completion(
            self.tokenizer,
            prompt,
            completion,
            max_length=o.max_length,
            eos_token=eos,
            completion_only=only,
        )


def load_model(
    options: FitOptions, device: str = "auto", progress: bool = True
) -> Tuple[torch.nn.Module, Any]:
    """The model (with its adapter, trainable) and tokenizer of the options,
    offline (see [load_pretrained][pydvl_datainf.hf.load_pretrained])."""
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_pretrained(
        options.model,
        task=options.task,
        adapter=options.adapter,
        tokenizer=options.tokenizer,
        dtype=getattr(torch, options.dtype),
        device=device,
    )


def _regularization(value: str) -> Any:
    if value == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError:
        raise typer.BadParameter(
            f"regularization must be 'auto' or a float, not {value!r}"
        ) from None


def _resolved(options: FitOptions) -> FitOptions:
    """Options with absolute paths and the digest of the data."""
    if options.data is None:
        raise typer.BadParameter("Give --data (the training data)")

    def absolute(p: Optional[str]) -> Optional[str]:
        return None if p is None else str(Path(p).resolve())

    if options.task not in TASKS:
        raise typer.BadParameter(f"--task must be one of {list(TASKS)}")
    return dataclasses.replace(
        options,
        model=absolute(options.model),
        adapter=absolute(options.adapter),
        tokenizer=absolute(options.tokenizer),
        data=absolute(options.data),
        data_sha256=_digest(Path(options.data)),
    )


def _parts(
    options: FitOptions, device: str, progress: bool
) -> Tuple[torch.nn.Module, Any, Any, RightPaddingCollator, List[str]]:
    model, tokenizer = load_model(options, device, progress)
    wrapped, loss = wrap_model(model, options.task)
    collate = RightPaddingCollator(tokenizer.pad_token_id)
    if options.text_column is not None:
        text = [options.text_column]
    else:
        text = [options.prompt_column, options.completion_column]
    return wrapped, loss, tokenizer, collate, text


def _rows(options: FitOptions, tokenizer: Any, path: str, split: str) -> TokenizedRows:
    return TokenizedRows(load_rows(path, split), _Tokenize(tokenizer, options))


def _version() -> str:
    try:
        return version("pydvl-datainf")
    except PackageNotFoundError:  # pragma: no cover - a source tree
        return "unknown"


def build(
    options: FitOptions,
    *,
    store: Optional[str] = None,
    overwrite: bool = False,
    device: str = "auto",
    progress: bool = True,
) -> DatasetInfluence:
    """Fit DataInf as the `fit` command does, recording the options in the store.

    Args:
        options: the fit options.
        store: the Zarr store to write (`None`: in memory).
        overwrite: replace an existing store written by this library.
        device: `"auto"` (a GPU if there is one), `"cpu"`, `"cuda"`, ...
        progress: show progress bars.

    Returns:
        The fitted [DatasetInfluence][pydvl_datainf.dataset_influence.DatasetInfluence].
    """
    options = _resolved(options)
    assert options.data is not None
    wrapped, loss, tokenizer, collate, text = _parts(options, device, progress)
    store_kwargs: Dict[str, Any] = (
        {"store": "memory"}
        if store is None
        else {
            "store": "zarr",
            "store_path": store,
            "store_dtype": options.store_dtype,
            "store_options": {"overwrite": overwrite},
        }
    )
    infl = DataInfInfluence(
        wrapped,
        loss,
        _regularization(options.regularization),
        options.block_structure,
        progress=progress,
        **store_kwargs,
    )
    result = DatasetInfluence(
        infl, collate, batch_size=options.batch_size, ids=options.id_column, text=text
    )
    rows = _rows(options, tokenizer, options.data, options.split)
    metadata = {CLI_KEY: dataclasses.asdict(options), "version": _version()}
    logger.info("Fitting DataInf on %d rows of %s", len(rows), options.data)
    return result.fit(rows, metadata=metadata)


def recorded_options(store: str) -> FitOptions:
    """The fit options recorded in a store written by the command line."""
    recorded = stored_metadata(store).get(CLI_KEY)
    if not recorded:
        raise StoreMismatchError(
            f"The store at {store!r} was not written by `pydvl-datainf fit`: it "
            f"records no command line options"
        )
    return FitOptions.from_dict(dict(recorded))


def reopen(
    store: str, *, device: str = "auto", progress: bool = True
) -> DatasetInfluence:
    """A store written by `fit`, with its model and training rows, checked."""
    options = recorded_options(store)
    assert options.data is not None
    wrapped, loss, tokenizer, collate, text = _parts(options, device, progress)
    rows = _rows(options, tokenizer, options.data, options.split)
    return DatasetInfluence.from_store(
        wrapped,
        loss,
        store,
        rows,
        collate,
        ids=options.id_column,
        text=text,
        progress=progress,
    )


def command_line(options: FitOptions, store: str) -> str:
    """The `pydvl-datainf fit` command that fits with `options` into `store`."""
    words = ["pydvl-datainf", "fit"]
    for f in _fields(FitOptions):
        value = getattr(options, f.name)
        if value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            on, off = {
                "completion_only": ("--completion-only", "--full-sequence"),
                "add_eos": ("--add-eos", "--no-eos"),
            }[f.name]
            words.append(on if value else off)
        else:
            words += [flag, str(value)]
    words += ["--store", store]
    return shlex.join(words)


# ----------------------------------------------------------------- output
def _emit(frame: pd.DataFrame, table: "TableOptions") -> None:
    output, show = table.output, table.show
    if output is not None:
        suffix = output.suffix.lower()
        output.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".csv":
            frame.to_csv(output, index=False)
        elif suffix == ".jsonl":
            frame.to_json(output, orient="records", lines=True, force_ascii=False)
        elif suffix == ".json":
            frame.to_json(output, orient="records", force_ascii=False)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.write_table(to_arrow(frame), output)
        else:
            raise typer.BadParameter(
                f"Unknown table format {suffix!r}: use .csv, .jsonl, .json or .parquet"
            )
        typer.echo(f"wrote {len(frame)} rows to {output}", err=True)
    if show:
        with pd.option_context("display.width", 200, "display.max_colwidth", 60):
            typer.echo(frame.head(show).to_string(index=False))


def _source(fit: FitOptions, run: RunOptions) -> DatasetInfluence:
    """Fit first when fit options are given, else reopen `--store`."""
    if fit.data is not None:
        return build(
            fit,
            store=run.store,
            overwrite=run.overwrite,
            device=run.device,
            progress=run.progress,
        )
    if run.store is None:
        raise typer.BadParameter("Give --store (a fitted store), or the fit options")
    return reopen(run.store, device=run.device, progress=run.progress)


def _test_rows(result: DatasetInfluence, test: TestOptions) -> Any:
    if test.test is None:
        raise typer.BadParameter("Give --test (the test data)")
    train = result.train
    assert train is not None and isinstance(train.dataset, TokenizedRows)
    return TokenizedRows(load_rows(test.test, test.test_split), train.dataset.tokenize)


@app.callback()
def _main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log progress.")
    ] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


@app.command("fit")
@_with(fit=FitOptions, run=RunOptions)
def fit_command(fit: FitOptions, run: RunOptions) -> None:
    """Fit DataInf on the training data and record the run in the store."""
    if run.store is None:
        raise typer.BadParameter("Give --store (the Zarr store to write)")
    infl = build(
        fit,
        store=run.store,
        overwrite=run.overwrite,
        device=run.device,
        progress=run.progress,
    ).influence
    typer.echo(
        f"fitted {infl.n_train} rows, {len(infl.block_names)} blocks, "
        f"{infl.n_parameters} parameters into {run.store}",
        err=True,
    )


@app.command("self-influence")
@_with(fit=FitOptions, run=RunOptions, table=TableOptions)
def self_influence_command(
    fit: FitOptions,
    run: RunOptions,
    table: TableOptions,
    top: Annotated[
        Optional[int], typer.Option(help="Keep the first rows only.")
    ] = None,
) -> None:
    """Rank the training rows by self-influence (largest first: unusual rows)."""
    _emit(_source(fit, run).self_influence(top=top), table)


@app.command("top-k")
@_with(fit=FitOptions, run=RunOptions, test=TestOptions, table=TableOptions)
def top_k_command(
    fit: FitOptions,
    run: RunOptions,
    test: TestOptions,
    table: TableOptions,
    k: Annotated[
        int, typer.Option("-k", "--k", help="Training rows per test row.")
    ] = 10,
    harmful: Annotated[
        bool, typer.Option(help="The most harmful rows instead of the most helpful.")
    ] = False,
) -> None:
    """The k most helpful (or harmful) training rows of every test row."""
    result = _source(fit, run)
    _emit(result.top_k(_test_rows(result, test), k, largest=not harmful), table)


@app.command("mean-influence")
@_with(fit=FitOptions, run=RunOptions, test=TestOptions, table=TableOptions)
def mean_influence_command(
    fit: FitOptions,
    run: RunOptions,
    test: TestOptions,
    table: TableOptions,
    harmful: Annotated[
        bool, typer.Option(help="Most harmful first (the mislabel ranking).")
    ] = False,
    top: Annotated[
        Optional[int], typer.Option(help="Keep the first rows only.")
    ] = None,
) -> None:
    """Rank the training rows by their influence on the mean test loss."""
    result = _source(fit, run)
    rows = _test_rows(result, test)
    _emit(result.mean_test_influence(rows, ascending=harmful, top=top), table)


@app.command("matrix")
@_with(fit=FitOptions, run=RunOptions, test=TestOptions)
def matrix_command(
    fit: FitOptions,
    run: RunOptions,
    test: TestOptions,
    output: Annotated[str, typer.Option(help="Zarr path of the influence matrix.")],
    resume: Annotated[bool, typer.Option(help="Finish an interrupted matrix.")] = False,
) -> None:
    """The whole influence matrix (test rows x training rows), streamed to Zarr.

    `--overwrite` replaces an earlier matrix (not the gradient store)."""
    overwrite, run = run.overwrite, dataclasses.replace(run, overwrite=False)
    result = _source(fit, run)
    matrix = result.matrix(
        _test_rows(result, test), output, resume=resume, overwrite=overwrite
    )
    typer.echo(
        f"wrote the {matrix.n_test} x {matrix.n_train} influence matrix to {output}",
        err=True,
    )


@app.command("info")
def info_command(
    store: Annotated[str, typer.Option(help="Zarr gradient store written by fit.")],
) -> None:
    """Print the recorded run of a store, and the command that makes it."""
    options = recorded_options(store)
    metadata = stored_metadata(store)
    typer.echo(
        json.dumps(
            {
                "options": dataclasses.asdict(options),
                "version": metadata.get("version"),
                "command": command_line(options, store),
            },
            indent=2,
        )
    )


@app.command("replay")
@_with(run=RunOptions)
def replay_command(
    run: RunOptions,
    to: Annotated[str, typer.Option(help="The new store.")],
) -> None:
    """Fit again, into a new store, with the options recorded in `--store` (the
    data must not have changed)."""
    if run.store is None:
        raise typer.BadParameter("Give --store (the store whose fit to replay)")
    options = recorded_options(run.store)
    assert options.data is not None
    if options.data_sha256 is not None and Path(options.data).exists():
        now = _digest(Path(options.data))
        if now != options.data_sha256:
            raise StoreMismatchError(
                f"The data at {options.data!r} changed since the fit recorded in "
                f"{run.store!r} (SHA-256 {options.data_sha256[:12]}..., now "
                f"{now[:12]}...)"
            )
    build(
        options,
        store=to,
        overwrite=run.overwrite,
        device=run.device,
        progress=run.progress,
    )
    typer.echo(f"replayed the fit of {run.store} into {to}", err=True)


def main(argv: Optional[List[str]] = None) -> None:
    """Run the command line (the `pydvl-datainf` console script).

    Errors that name a problem of the input (a mismatched store, a missing
    file, bad data or options) are printed as one line, with exit status 1;
    `--verbose` shows their traceback.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        app(args=args, prog_name="pydvl-datainf")
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        if "-v" in args or "--verbose" in args:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        typer.echo(f"error: {message}", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":  # python -m pydvl_datainf.cli
    main()
