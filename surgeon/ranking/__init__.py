"""Ranking heads by Concept Consistency Score: statistics, TextSpan, judges."""
