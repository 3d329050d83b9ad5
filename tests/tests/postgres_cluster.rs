//! The throwaway PostgreSQL cluster the driver's tests run against
//! (`colony_tests::postgres`): each database it hands out is new and empty.

use colony_tests::postgres::fresh_database;

#[test]
fn each_fresh_database_is_distinct_and_empty() {
    let Some(first) = fresh_database() else {
        return; // skipped: no PostgreSQL server binaries (said once on stderr)
    };
    let second = fresh_database().expect("the cluster is already running");
    assert_ne!(first, second);

    let mut names = Vec::new();
    for url in [&first, &second] {
        let mut client = postgres::Client::connect(url, postgres::NoTls)
            .unwrap_or_else(|e| panic!("connecting to {url}: {e:?}"));
        let row = client
            .query_one(
                "SELECT current_database()::TEXT,
                        (SELECT COUNT(*) FROM pg_class c
                           JOIN pg_namespace n ON n.oid = c.relnamespace
                          WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast'))",
                &[],
            )
            .unwrap();
        let (name, relations): (String, i64) = (row.get(0), row.get(1));
        assert_eq!(relations, 0, "{name} is not empty");
        assert!(url.ends_with(&format!("/{name}")), "{url} is not {name}");
        names.push(name);

        // A table made here must not show up in the other database.
        client
            .batch_execute("CREATE TABLE probe (id BIGINT PRIMARY KEY)")
            .unwrap();
    }
    assert_ne!(names[0], names[1]);
}
