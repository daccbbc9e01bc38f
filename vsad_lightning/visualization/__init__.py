"""Pictures of a test run (``figures``) and the run report page (``report_page``)."""
