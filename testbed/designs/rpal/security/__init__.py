"""The security review of RPAL (`testbed security`, `testbed run --suite security`).

What MPK keeps between two RPAL services and what it can't, one row per attack:

- table.py: the expected column, read from ../SECURITY.md (the docs a reviewer edits);
- observe.py: the guest's observation lines (`ROW NAME OBSERVED k=v... | text`);
- gadgets.py: the WRPKRU/XRSTOR byte scan (pure) and the host's scan of every
  service's executable pages through the page-table walker and guest RAM;
- hostview.py: the host's view of the entries a row involves, from its snapshot;
- judge.py: a row's expected and observed value -> a finding (pure);
- runner.py: the scenario on a guest (the design's special runner);
- cli.py: `testbed security`.
"""
