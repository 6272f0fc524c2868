"""Side-by-side measurements of flashsale's design choices (benchmarks, not tests).

``python -m benchmarks`` runs them all against one pair of servers and prints one table;
``--help`` lists them. Every figure comes with the CPU share of the process that generated
its load, and every way of holding stock with the units it oversold: a strategy that is
fast because it is wrong is shown as wrong. Results and how to read them:
docs/benchmarks.md.
"""
