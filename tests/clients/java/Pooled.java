// pgjdbc through a pooled pgbastion (tests/it/pool.rs): with
// prepareThreshold=1 every statement becomes a named server-side prepared
// statement (S_1, S_2, ...) from its first use; several connections are
// interleaved, with a transaction that fails and one that commits.
// Usage: java -cp postgresql.jar Pooled.java HOST PORT USER PASSWORD CAFILE
// Prints "ok" or throws.
import java.sql.*;
import java.util.*;

public class Pooled {
    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://" + args[0] + ":" + args[1] + "/postgres"
            + "?sslmode=verify-full&sslrootcert=" + args[4] + "&prepareThreshold=1";
        List<Connection> conns = new ArrayList<>();
        for (int i = 0; i < 4; i++) {
            conns.add(DriverManager.getConnection(url, args[2], args[3]));
        }
        for (int round = 0; round < 20; round++) {
            for (int i = 0; i < conns.size(); i++) {
                try (PreparedStatement ps = conns.get(i).prepareStatement("select ?::int + ?::int")) {
                    ps.setInt(1, round);
                    ps.setInt(2, i);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        if (rs.getInt(1) != round + i) throw new AssertionError("sum");
                    }
                }
            }
        }
        Connection c = conns.get(0);
        c.setAutoCommit(false);
        try (PreparedStatement ps = c.prepareStatement("select 1/?::int")) {
            ps.setInt(1, 0);
            ps.executeQuery();
            throw new AssertionError("division by zero did not fail");
        } catch (SQLException e) {
            if (!"22012".equals(e.getSQLState())) throw e;
        }
        c.rollback();
        try (PreparedStatement ps = c.prepareStatement("select ?::text")) {
            ps.setString(1, "after rollback");
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                if (!"after rollback".equals(rs.getString(1))) throw new AssertionError("text");
            }
        }
        c.commit();
        for (Connection conn : conns) conn.close();
        System.out.println("ok");
    }
}
