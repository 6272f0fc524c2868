"""Load drills for flashsale: Locust scenarios that replay a Double 11 opening over HTTP.

The pieces, one concern per module:

- ``shapes``     arrival-rate curves ``rate(t)`` with exact integrals (midnight_surge,
                 double11_day, capacity_step, soak);
- ``arrivals``   the open-model arrival schedule and its dispatcher (sub-second timing,
                 a wall-clock T0 rendezvous shared by every Locust process, dropped arrivals);
- ``latency``    HdrHistogram recording, merging and log files (raw and corrected for
                 coordinated omission);
- ``recording``  what one Locust process records per second and how the pieces from all
                 processes are merged into one run;
- ``personas``   browsers, buyers, abandoners, bots and retry-storm clients;
- ``drill``      the drill's sale and buyer tokens, set up through the admin API;
- ``admin``      the operator's HTTP calls (tokens, sales, stats, audit);
- ``oracle``     the end-of-run verdict: nothing oversold, lost or duplicated;
- ``slo``        k6-style thresholds and run validity;
- ``exit_codes`` what a drill's exit status means;
- ``report``     summary.json, the per-second timeline, HdrHistogram logs, report.html;
- ``surge``      the locustfile (``locust -f loadtests/surge.py --host …``).

This package talks to the service over HTTP only; it never imports the service.
"""
