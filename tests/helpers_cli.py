"""Small-run CLI options shared by the tests that prune tiny models through `secateurs.cli.main`."""


def small(nsamples: int = 4, seq_len: int = 16, eval_tokens: int = 64) -> list[str]:
    """Calibration and evaluation sizes a tiny model with a short text can serve, on the CPU."""
    return [
        *("--nsamples", str(nsamples), "--seq-len", str(seq_len)),
        *("--eval-seq-len", str(seq_len), "--eval-tokens", str(eval_tokens), "--device", "cpu"),
    ]
