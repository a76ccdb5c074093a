"""The benchmark behind ``python -m tandem_jax.benchmark``, in parts: ``chain`` trains (or reuses) every model,
``quality`` measures Tables 1 and 3 on the validation split, ``timing`` times decoding (Tables 2-4, the cost ratio
c), ``report`` writes results.json, the Markdown report and the plots. ``tandem_jax.benchmark`` is the command
line."""
