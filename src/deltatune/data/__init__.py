"""Small real data sets shipped with deltatune for examples, tests and experiments.

``sentiment.jsonl``: 5,500 human-rated sentences (binary sentiment; fields ``text``,
``label``, ``domain``, ``split``), an extract of the VADER data of Hutto & Gilbert
(ICWSM 2014), MIT license; see ``SENTIMENT_LICENSE.md`` for attribution and provenance.
Read it with ``importlib.resources.files("deltatune.data") / "sentiment.jsonl"``.
"""
