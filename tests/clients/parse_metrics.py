"""Parses pgbastion's /metrics (standard input) with prometheus_client's
OpenMetrics parser, which rejects anything malformed, and prints every
sample as JSON: [{"name", "labels", "value"}]."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

samples = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        samples.append({"name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(samples))
