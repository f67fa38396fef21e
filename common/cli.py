"""Command-line pieces every script shares: argument types that refuse what cannot be meant
(one argparse line naming the flag, exit code 2) and a help formatter that shows every default
once."""
import argparse
import math


def _number(kind, lo=None, hi=None, lo_open=False, what=None):
    """argparse type: a `kind` (int or float) within [lo, hi] (lo excluded when lo_open).
    argparse turns the ArgumentTypeError into one line naming the flag, exit code 2."""
    what = what or ("a whole number" if kind is int else "a number")
    bound = (f" > {lo}" if lo_open else f" >= {lo}") if lo is not None else ""
    bound += f" and <= {hi}" if hi is not None else ""

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}{bound}, got '{text}'") from None
        if (not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo))
                or (hi is not None and v > hi)):
            raise argparse.ArgumentTypeError(f"expected {what}{bound}, got '{text}'")
        return v
    parse.__name__ = f"{kind.__name__}{bound}"
    return parse


positive_int = _number(int, 1)                      # epochs, batch sizes, iterations, counts
nonneg_int = _number(int, 0)                        # workers, "0 = off" switches, seeds
positive_float = _number(float, 0, lo_open=True)    # learning rates, temperatures
nonneg_float = _number(float, 0)                    # weight decay, loss weights
unit_float = _number(float, 0, 1)                   # momenta, probabilities, fractions in [0, 1]


def int_at_least(lo):
    return _number(int, lo)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option shows its default exactly once: `(default: X)` is appended unless the help
    already says what the default is (derived defaults: `default ...` in the text)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is None or action.default is False or action.default == argparse.SUPPRESS
                or not action.option_strings or "default" in text.lower()):  # 0 is a default
            return text
        value = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) \
            else action.default
        return f"{text} (default: {value})".strip()


def parser(doc):
    """The argparse parser every script starts from: its docstring's first paragraph as the
    description, every default shown."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=HelpFormatter)


def odd_kernel(text):
    """argparse type: a Gaussian kernel size, an odd whole number >= 3."""
    v = int_at_least(3)(text)
    if v % 2 == 0:
        raise argparse.ArgumentTypeError(f"expected an odd whole number >= 3, got '{text}'")
    return v
