"""``pellucid review``: a local web page to review a model's explanations and correct it.

:mod:`~pellucid.training.review.session` holds the model, the samples and interventions (no HTTP),
:mod:`~pellucid.training.review.corrections_state` the corrections file its marks are written to;
:mod:`~pellucid.training.review.server` serves it with the standard library's HTTP server on 127.0.0.1 and one
static page (``page.html``, vanilla JavaScript, nothing fetched from elsewhere).
"""
