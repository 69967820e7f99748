-- Indexes for purge_expired and the audit filters (identity, since), which scan by time.

CREATE INDEX pending_expires ON pending_authorizations (expires_at);
CREATE INDEX used_links_expires ON used_links (expires_at);
CREATE INDEX sessions_expires ON sessions (expires_at);
CREATE INDEX audit_at ON audit_events (at);
CREATE INDEX audit_identity_at ON audit_events (identity, at);
