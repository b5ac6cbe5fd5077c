-- eventbus schema, version 6: tenants isolated by row-level security.
-- Expand only: no role is confined until it is given tenants in eventbus_tenant_roles (`eventbus migrate --roles
-- TENANT ...`), so every role that worked before sees what it saw; superusers bypass row-level security anyway.

-- The roles that act for given tenants only (a producer's or an operator's), by role name: a role, or one of
-- the roles it is a member of, listed here is confined to the rows of these tenants, and within them to the
-- session's tenant (the setting eventbus.tenant, which the bus sets for every connection and transaction).
-- A role listed nowhere (a relay's, a consumer's, the owner's) sees every tenant.
CREATE TABLE __schema__.eventbus_tenant_roles (
    role   name NOT NULL,
    tenant text NOT NULL,
    PRIMARY KEY (role, tenant)
);

-- The inbox records the tenant of the events too (the release before writes '' until it is replaced).
ALTER TABLE __schema__.eventbus_inbox ADD COLUMN tenant text NOT NULL DEFAULT '';

-- FORCE: the tables' owner is held to the policies too (it bypasses them otherwise); it is listed nowhere, so it
-- still sees every tenant, unless it is given tenants itself. Both subqueries of the policy are uncorrelated:
-- each runs once per statement, not once per row. A role that was dropped drops out through the join with
-- pg_roles (pg_has_role would raise on its name). USAGE, not MEMBER: a membership that does not inherit (the one
-- PostgreSQL 16 gives the non-superuser who created a role) does not confine.
DO $migration$
DECLARE
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['eventbus_outbox', 'eventbus_dead_letters', 'eventbus_inbox'] LOOP
        EXECUTE format('ALTER TABLE __schema__.%I ENABLE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE __schema__.%I FORCE ROW LEVEL SECURITY', t);
        EXECUTE format($policy$
            CREATE POLICY eventbus_tenant ON __schema__.%I USING (
                NOT EXISTS (SELECT FROM __schema__.eventbus_tenant_roles AS g JOIN pg_catalog.pg_roles AS r
                            ON r.rolname = g.role WHERE pg_catalog.pg_has_role(r.oid, 'USAGE'))
                OR (tenant = current_setting('eventbus.tenant', true)
                    AND EXISTS (SELECT FROM __schema__.eventbus_tenant_roles AS g JOIN pg_catalog.pg_roles AS r
                                ON r.rolname = g.role
                                WHERE g.tenant = current_setting('eventbus.tenant', true)
                                  AND pg_catalog.pg_has_role(r.oid, 'USAGE'))))
        $policy$, t);
    END LOOP;
END
$migration$;

GRANT SELECT ON __schema__.eventbus_tenant_roles TO PUBLIC;
