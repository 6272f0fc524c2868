"""The war room: the live page operators watch during a sale (``routes``: the page, its
data endpoint, history, target curve, alert thresholds, operator controls and log), and
the static page itself (``static/``)."""
