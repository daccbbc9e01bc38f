"""Lightning callbacks: every side effect (bank building, files, pictures) lives here."""
