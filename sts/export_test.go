package sts

import "context"

// RefreshDue runs one pass of the background refresh, for tests.
func (m *Manager) RefreshDue(ctx context.Context) { m.refreshDue(ctx) }
