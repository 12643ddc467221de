"""``kdcli study``: a whole comparison (methods × corruption settings × seeds × pairs) as ordinary runs,
and the results tables and plots of ``kdcli study`` and ``kdcli compare``."""
