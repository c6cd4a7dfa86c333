"""Report stage: snapshots and findings rendered for people (text, HTML) and machines."""
