"""Datasets: loaders for Alpaca and GSM8K files, templates, synthetic generators,
download (``llmenergy data fetch``) and answer scoring.

Import from the modules (this package re-exports nothing, so importing one of
its modules never runs the others): :mod:`~llmenergy.data.prompts`
(:class:`DatasetSpec`, :class:`Prompt`, :func:`load_prompts`,
:func:`check_dataset`), :mod:`~llmenergy.data.accuracy` (:func:`extract_answer`
and :func:`is_correct` for GSM8K accuracy).
"""
