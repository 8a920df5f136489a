//! Blocking: whom a user refuses direct messages, files and group additions from, and
//! whose group messages they are not sent. The list is kept here; it is enforced where
//! the relay stores (the direct-message statement, the group fan-out, file access and
//! group additions), so a blocked user's traffic never reaches the blocker.

use fastchat_common::db::DbConn;
use fastchat_common::proto::{ErrorCode, Refusal, RelayToClient};

/// A change to, or a read of, the asking user's block list.
#[derive(Debug, Clone)]
pub enum BlockOp {
    Add { user: String },
    Remove { user: String },
    List,
}

/// Most users one user may block (the `blocked` reply lists them all in one frame:
/// 1,000 names of at most 32 bytes fit well inside 64 KiB).
pub const MAX_BLOCKED: i64 = 1_000;

/// Whether `recipient` blocked `sender` (for the rarer paths: files and group
/// additions; the direct-message statement checks in SQL).
pub const IS_BLOCKED: &str = "SELECT 1 FROM blocks WHERE user_id = $1 AND blocked_id = $2";

/// Runs `op` for `user_id` in one transaction; answers with the whole list.
pub fn run(
    conn: &mut DbConn,
    user_id: i64,
    op: BlockOp,
    req: u64,
) -> Result<Result<Vec<RelayToClient>, Refusal>, postgres::Error> {
    let mut tx = conn.transaction()?;
    let id_of = |tx: &mut postgres::Transaction<'_>, name: &str| {
        tx.query_opt("SELECT id FROM users WHERE name = $1", &[&name])
            .map(|r| r.map(|r| r.get::<_, i64>(0)))
    };
    match op {
        BlockOp::Add { user } => {
            let Some(blocked) = id_of(&mut tx, &user)? else {
                return Ok(Err(Refusal::new(
                    ErrorCode::UnknownUser,
                    format!("there is no user called {user}"),
                )));
            };
            if blocked == user_id {
                return Ok(Err(Refusal::new(
                    ErrorCode::BadFrame,
                    "you cannot block yourself",
                )));
            }
            // The user's row is locked so two additions at once cannot pass the cap.
            tx.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", &[&user_id])?;
            let count: i64 = tx
                .query_one(
                    "SELECT count(*) FROM blocks WHERE user_id = $1",
                    &[&user_id],
                )?
                .get(0);
            let already = tx.query_opt(IS_BLOCKED, &[&user_id, &blocked])?.is_some();
            if !already && count >= MAX_BLOCKED {
                return Ok(Err(Refusal::new(
                    ErrorCode::TooLarge,
                    format!("you have blocked {MAX_BLOCKED} users, the most allowed; unblock someone first"),
                )));
            }
            tx.execute(
                "INSERT INTO blocks (user_id, blocked_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&user_id, &blocked],
            )?;
        }
        BlockOp::Remove { user } => {
            tx.execute(
                "DELETE FROM blocks WHERE user_id = $1
                 AND blocked_id = (SELECT id FROM users WHERE name = $2)",
                &[&user_id, &user],
            )?;
        }
        BlockOp::List => {}
    }
    let users = tx
        .query(
            "SELECT u.name FROM blocks b JOIN users u ON u.id = b.blocked_id
             WHERE b.user_id = $1 ORDER BY u.name",
            &[&user_id],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect();
    tx.commit()?;
    Ok(Ok(vec![RelayToClient::Blocked { id: req, users }]))
}
