//! Volumes (the next issue fills this module in). For now: the queries other modules
//! need to refuse changes to things a volume uses. The `volumes` table already exists
//! (see `store`), so the counts are real.

use crate::store::count;

/// Number of volumes of a volume type.
pub async fn count_by_type(
    conn: &mut sqlx::AnyConnection,
    type_id: &str,
) -> Result<i64, sqlx::Error> {
    count(
        conn,
        "SELECT COUNT(*) AS n FROM volumes WHERE type_id = ?",
        type_id,
    )
    .await
}

/// Number of volumes whose encryption key is this secret.
pub async fn count_by_secret(
    conn: &mut sqlx::AnyConnection,
    secret_id: &str,
) -> Result<i64, sqlx::Error> {
    count(
        conn,
        "SELECT COUNT(*) AS n FROM volumes WHERE encryption_key_id = ?",
        secret_id,
    )
    .await
}
