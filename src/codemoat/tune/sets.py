"""What `codemoat tune` trains, validates and scores on, beyond the indexed files themselves: `vendor train`'s
sample mix for this tokenizer, the validation files set aside, the replayed public code, and the held-out
and unrelated sets scored before and after (`trainer.py` runs the tune)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .trainer import TuneOptions


def data_options(tok, eos: str | None, repo: str):
    """`vendor train`'s sample mix, limited to what this tokenizer has: FIM samples only with its
    FIM tokens, cross-file context only with <|repo_name|>/<|file_sep|>, each sample ended by its own
    end-of-text token (a Gemma base has none of the first, and `<eos>` for the last); otherwise
    those markers would be trained as ordinary text."""
    from ..train.data import DataOptions
    from ..train.tokenizer import ENDOFTEXT, FILE_SEP, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX, REPO_NAME

    def has(*names: str) -> bool:
        return all(tok.token_to_id(n) is not None for n in names)

    return DataOptions(
        repo_name=repo,
        fim_rate=0.5 if has(FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE) else 0.0,
        repo_rate=0.2 if has(REPO_NAME, FILE_SEP) else 0.0,
        eos=eos if eos and has(eos) else ENDOFTEXT if has(ENDOFTEXT) else "",
    )


def validation_split(files: list, opts: TuneOptions) -> tuple[list, list]:
    """(train, validation): a few training files set aside (none when that would leave too few to train on)."""
    from ..train.corpus import split

    if opts.val_fraction <= 0 or len(files) < 4:
        return files, []
    train, val = split(files, opts.val_fraction, opts.seed + 1)
    return (train, val) if len(train) >= 2 else (files, [])


def replay_rows(tok, eos: str | None, n_ctx: int, opts: TuneOptions, n_rep: int):
    """Rows of public code the base learnt from (`evaluate.replay_files`), rendered as `vendor train`
    renders its corpus (FIM and plain samples, packed), shuffled by the seed; None without one. With
    `steps` only as much code as those steps replay (about 4 characters a token, twice over)."""
    from ..train.data import epoch_rows
    from .evaluate import REPLAY_CHARS, replay_files

    chars = REPLAY_CHARS if not opts.steps else min(REPLAY_CHARS, 8 * opts.steps * n_rep * (n_ctx + 1))
    files = replay_files(opts.seed, chars)
    try:
        return epoch_rows(files, tok, n_ctx, data_options(tok, eos, "python"), opts.seed, 0)
    except ValueError:  # not one full row
        return None


def eval_sets(held: list, tok, n_ctx: int, opts: TuneOptions) -> dict[str, tuple[list, int, int]]:
    """{name: (windows, bytes, tokens per file)} scored before and after tuning: "tuned", every held-out
    file of the tuned repositories, and "unrelated", CPython modules the bundled model never trained on
    (the forgetting check), each up to the same number of tokens per file within `eval_tokens`; with
    `old_eval_tokens` also the figures of sessions up to 8: "tuned_first", the first tokens in path
    order, and "unrelated_seen", ten CPython modules nine of which are the bundled model's training files."""
    from .evaluate import per_file_tokens, seen_files, spread_windows, token_windows, unrelated_files

    sets = {"tuned": held, "unrelated": unrelated_files()}
    out = {
        k: (*spread_windows(fs, tok, n_ctx, opts.eval_tokens), per_file_tokens(fs, tok, opts.eval_tokens))
        for k, fs in sets.items()
    }
    if opts.old_eval_tokens:
        out["tuned_first"] = (*token_windows(held, tok, n_ctx, opts.old_eval_tokens), 0)
        out["unrelated_seen"] = (*token_windows(seen_files(), tok, n_ctx, opts.old_eval_tokens), 0)
    return out
