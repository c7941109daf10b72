"""The ops: each op's public function and spec (<op>.py), and what a spec makes (spec.py, _op.py)."""
